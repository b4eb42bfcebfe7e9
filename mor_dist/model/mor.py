"""The Mixture-of-Recursions model: vanilla, recursive and MoR in one code path.

forward() is a chain of three pieces -- begin (embedding + unique first layers), step r for each
recursion, finish (unique last layers, norm, head, loss) -- passing a RecursionState along, so that a
pipeline schedule can place the pieces on different stages without touching this file. A step is
itself route -> the block's layers -> merge, and step(r, state, span) runs part of its layers, so a
stage cut can also fall inside a recursion (the state then carries the partial block output).

Where we differ from the authors' code (github raymin0223/mixture_of_recursions):
- Recursive KV sharing gathers the active queries and computes only them at later recursions; the
  authors run the full sequence at every recursion and mask, which saves no compute (MOR.md 5).
- Capacity-warmup and max-depth-warmup step counters are a buffer (saved in checkpoints), and the
  evaluation routing is causal (sigmoid > 0.5 / argmax) rather than top-k over the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from mor_dist.model.layers import RMSNorm, RotaryEmbedding, TokenFrame, TransformerLayer
from mor_dist.model.layout import make_layout
from mor_dist.model.routers import (
    ExpertChoiceRouter,
    TokenChoiceRouter,
    bce_topk_loss,
    capacity_at,
    compact,
    topk_in_order,
)


def _plain(cfg):
    """A config group as a plain object: the forward reads it at every call, and OmegaConf nodes
    are slow to read and opaque to torch.compile."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        return cfg
    obj = OmegaConf.to_object(cfg)
    return SimpleNamespace(**obj) if isinstance(obj, dict) else obj


@dataclass
class RecursionState:
    """Everything that flows between the pieces of the forward pass."""

    h: torch.Tensor  # (B, T, d) residual stream
    pos: torch.Tensor  # (B, T) original positions
    mode: str  # "topk" (training) or "causal" (inference-time decisions)
    depth: torch.Tensor  # (B, T) recursion steps each token went through
    idx: torch.Tensor | None = None  # expert-choice: tokens selected at the previous step (B, K)
    valid: torch.Tensor | None = None  # (B, K) padding mask for idx (causal mode only)
    h1: torch.Tensor | None = None  # token-choice: first unique layer's output
    run: torch.Tensor | None = None  # token-choice: f^r(h1) of tokens still recursing
    assigned: torch.Tensor | None = None  # token-choice: chosen depth 1..Nr per token
    gate: torch.Tensor | None = None  # token-choice: router probability of the chosen depth
    # Inside a recursion step (between route and merge): the block's input tokens as slots of the
    # sequence (B, K) (None: every token), their padding mask, the partial block output (B, K, d),
    # and expert-choice's weighted gate of each slot (B, K).
    slots: torch.Tensor | None = None
    slots_valid: torch.Tensor | None = None
    x: torch.Tensor | None = None
    wgate: torch.Tensor | None = None
    kv_store: dict = field(default_factory=dict)  # recursive KV sharing: recursion 1's K/V per layer
    aux: dict = field(default_factory=dict)  # name -> weighted aux loss (already multiplied by coef)
    stats: dict = field(default_factory=dict)  # name -> detached scalar tensor


@dataclass
class MoROutput:
    logits: torch.Tensor
    loss: torch.Tensor | None  # lm_loss + sum(aux)
    lm_loss: torch.Tensor | None
    aux: dict
    stats: dict
    depth: torch.Tensor  # (B, T) recursion depth each token reached


class MoRModel(nn.Module):
    def __init__(self, model_cfg, routing_cfg, kv_cfg):
        super().__init__()
        m, rt = _plain(model_cfg), _plain(routing_cfg)
        self.cfg, self.routing, self.kv_strategy = m, rt, kv_cfg.strategy
        self.layout = make_layout(m.n_layers, m.recursions, m.sharing, m.pad_layers)
        head_dim = m.head_dim or m.d_model // m.n_heads
        self.rope = RotaryEmbedding(head_dim, m.max_seq_len, m.rope_theta)

        def layer():
            return TransformerLayer(m.d_model, m.n_heads, m.n_kv_heads, head_dim, m.d_ff, m.norm_eps, self.rope)

        lay = self.layout
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        self.prefix = nn.ModuleList(layer() for _ in range(lay.prefix))
        # ONE set of shared parameters, applied at every recursion step (MOR.md 2: never copies).
        self.shared = nn.ModuleList(layer() for _ in range(lay.block))
        self.suffix = nn.ModuleList(layer() for _ in range(lay.suffix))
        self.norm = RMSNorm(m.d_model, m.norm_eps)
        self.head = None if m.tie_embeddings else nn.Linear(m.d_model, m.vocab_size, bias=False)

        self.routers = nn.ModuleList()
        self.token_router = None
        if rt.type == "expert":
            self.alpha = 0.1 if rt.alpha is None else rt.alpha
            self.routers.extend(
                ExpertChoiceRouter(m.d_model, rt.router, rt.causal_method == "aux_router")
                for _ in range(lay.recursions)
            )
            nr = lay.recursions
            self.capacity = list(rt.capacity) if rt.capacity else [(nr - r) / nr for r in range(nr)]
        elif rt.type == "token":
            self.alpha = rt.alpha if rt.alpha is not None else (1.0 if rt.token_func == "softmax" else 0.1)
            self.token_router = TokenChoiceRouter(m.d_model, lay.recursions, rt.router, rt.token_func, self.alpha)
        # Optimizer steps taken: drives capacity / max-depth warmups; saved with the model. The
        # forward reads its host copy: reading the buffer would stop the device every recursion.
        self.register_buffer("train_step", torch.zeros((), dtype=torch.long))
        # The routing warmup of this model's kind (capacity: expert-choice; max depth: token-choice).
        self.warmup_steps = {"expert": rt.capacity_warmup_steps, "token": rt.max_depth_warmup_steps}.get(rt.type, 0)
        self._set_host_step(0)
        self.register_load_state_dict_post_hook(lambda module, keys: module._sync_host_step())
        self.apply(self._init)

    def _init(self, mod: nn.Module) -> None:
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            nn.init.normal_(mod.weight, std=self.cfg.init_std)

    # ------------------------------------------------------------------ pieces of the forward pass
    def begin(self, tokens: torch.Tensor, mode: str) -> RecursionState:
        b, t = tokens.shape
        pos = torch.arange(t, device=tokens.device).expand(b, t)
        h = self.embed(tokens)
        h = self.run_layers(self.prefix, h, TokenFrame(pos))
        state = RecursionState(h=h, pos=pos, mode=mode, depth=torch.zeros_like(tokens))
        if self.token_router is not None:
            self._assign_depths(state)
        return state

    def step(self, r: int, state: RecursionState, span: tuple[int, int] | None = None) -> RecursionState:
        """Recursion step r (0-based) of the shared block. span=(lo, hi) runs only the block's layers
        lo..hi-1 of it: lo == 0 routes first, hi == the block's length merges after."""
        n = len(self.layout.schedule[r])
        lo, hi = span if span is not None else (0, n)
        if lo == 0:
            self._route(r, state)
        if state.x is not None and hi > lo:
            pos = state.pos if state.slots is None else state.pos.gather(1, state.slots)
            state.x = self._run_block(r, state.x, self._frame(r, pos, state.slots_valid, state), (lo, hi))
        if hi == n:
            self._merge(r, state)
        return state

    def finish(self, state: RecursionState, targets: torch.Tensor | None = None) -> MoROutput:
        h = self.norm(self.run_layers(self.suffix, state.h, TokenFrame(state.pos)))
        logits = self.output_logits(h)
        lm_loss = loss = None
        if targets is not None:
            lm_loss = self.lm_loss(logits, targets)
            loss = lm_loss + sum(state.aux.values()) if state.aux else lm_loss
        return MoROutput(logits, loss, lm_loss, state.aux, state.stats, state.depth)

    # Output head and loss. Tensor parallelism (mor_dist/parallel) replaces these two on the instance
    # with vocab-parallel versions; the model itself stays single-device code.
    def output_logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.embed.weight) if self.head is None else self.head(h)

    def lm_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, mode: str | None = None):
        """mode: "topk" (default in training) or "causal" (default in eval: inference decisions)."""
        mode = mode or ("topk" if self.training else "causal")
        state = self.begin(tokens, mode)
        for r in range(self.layout.recursions):
            state = self.step(r, state)
        return self.finish(state, targets)

    # ------------------------------------------------------------------ shared block
    def _frame(self, r, pos, valid, state) -> TokenFrame:
        kv_mode = "own" if self.kv_strategy != "share" else ("record" if r == 0 else "reuse")
        return TokenFrame(pos, valid, kv_mode, state.kv_store)

    def _run_block(self, r: int, x: torch.Tensor, frame: TokenFrame,
                   span: tuple[int, int] | None = None) -> torch.Tensor:
        """f: the shared layers of step r (those lo..hi-1 of span), each keyed by its slot j for KV sharing."""
        schedule = self.layout.schedule[r]
        lo, hi = span if span is not None else (0, len(schedule))
        return self.run_layers([self.shared[li] for li in schedule[lo:hi]], x, frame, range(lo, hi))

    def _route(self, r: int, s: RecursionState) -> None:
        """Choose the tokens step r runs: s.slots, s.slots_valid, and their block input s.x (None:
        no token runs)."""
        s.slots = s.slots_valid = s.x = s.wgate = None
        if self.token_router is not None:
            self._token_route(r, s)
        elif self.routers:
            self._expert_route(r, s)
        else:  # plain recursive model: every token, every step
            s.x = s.h

    def _merge(self, r: int, s: RecursionState) -> None:
        """Write step r's block output back into the residual stream; count the depths."""
        if s.x is not None:
            if self.token_router is not None:
                self._token_merge(r, s)
            elif self.routers:
                self._expert_merge(s)
            else:
                s.h = s.x
                s.depth = s.depth + 1
        s.slots = s.slots_valid = s.x = s.wgate = None

    def run_layers(self, layers, x: torch.Tensor, frame: TokenFrame, keys=None) -> torch.Tensor:
        """A span of layers over one token frame: the unique first layers, one recursion of the
        shared block, the unique last layers. Sequence parallelism replaces it on the instance."""
        for i, layer in enumerate(layers):
            x = layer(x, frame, None if keys is None else keys[i])
        return x

    # ------------------------------------------------------------------ expert-choice
    def _expert_route(self, r: int, s: RecursionState) -> None:
        b, t, d = s.h.shape
        if s.idx is None:  # step 1: every token is a candidate
            cand, cand_valid = s.pos.new_tensor(range(t)).expand(b, t), None
        else:
            cand, cand_valid = s.idx, s.valid
        if cand.shape[1] == 0:  # every token already exited (causal mode)
            self._record_active(r, s, 0.0)
            return
        h_c = s.h.gather(1, cand.unsqueeze(-1).expand(-1, -1, d))
        router = self.routers[r]
        logits = router(h_c)  # (B, Kc)
        causal_logits = router.causal_logits(h_c, logits)
        if s.mode == "topk":
            # The step counter is read only inside the warmup: torch.compile specializes on an int
            # attribute it reads and would recompile every step (train.compile runs the warmup eager).
            c = capacity_at(self.capacity[r], self.host_step, self.warmup_steps) if self.in_warmup else self.capacity[r]
            k = min(max(1, int(c * t)), cand.shape[1])
            sel = topk_in_order(logits, k)  # slots among the candidates
            valid = None
            if self.training or torch.is_grad_enabled():
                self._expert_aux(r, s, logits, causal_logits, sel)
        else:
            keep = causal_logits > 0
            if cand_valid is not None:
                keep = keep & cand_valid
            sel, valid = compact(keep, min_width=1)  # (see _token_route)
        idx = cand.gather(1, sel)
        s.idx, s.valid = idx, valid
        self._record_active(r, s, (idx.numel() if valid is None else valid.sum()) / (b * t))
        if idx.shape[1] == 0:
            return
        s.slots, s.slots_valid = idx, valid
        s.x = s.h.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))
        if self.routing.gating == "weighted":
            s.wgate = self.alpha * torch.sigmoid(logits.gather(1, sel))

    def _expert_merge(self, s: RecursionState) -> None:
        d = s.h.shape[-1]
        idx, valid, out = s.slots, s.slots_valid, s.x
        x = s.h.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))  # the block's input (h is unchanged until here)
        new = x + s.wgate.unsqueeze(-1).to(x.dtype) * out if s.wgate is not None else out
        if valid is not None:  # padding slots write back their own (unchanged) token
            new = torch.where(valid.unsqueeze(-1), new, x)
        s.h = s.h.scatter(1, idx.unsqueeze(-1).expand(-1, -1, d), new)
        s.depth = s.depth.scatter_add(1, idx, torch.ones_like(idx) if valid is None else valid.long())

    def _expert_aux(self, r, s, logits, causal_logits, sel) -> None:
        rt = self.routing
        target = torch.zeros_like(logits).scatter(1, sel, 1.0)
        # The causal decision learns to predict top-k membership (MOR.md 3).
        bce = bce_topk_loss(causal_logits, target)
        s.aux[f"router_bce/r{r + 1}"] = rt.aux_loss_coef * bce
        if rt.z_loss_coef > 0:
            s.aux[f"router_z/r{r + 1}"] = rt.z_loss_coef * logits.float().pow(2).mean()
        with torch.no_grad():
            pred = causal_logits > 0
            tgt = target.bool()
            s.stats[f"causal_agreement/r{r + 1}"] = (pred == tgt).float().mean()
            # Dead tokens: kept by top-k but dropped by the causal decision -- tokens that inference
            # would stop earlier than training did.
            s.stats[f"dead_tokens/r{r + 1}"] = (tgt & ~pred).float().sum() / tgt.float().sum()

    def _record_active(self, r: int, s: RecursionState, frac) -> None:
        # frac is a Python number in top-k mode: made on the hidden states' device, like every stat.
        s.stats[f"active_frac/r{r + 1}"] = torch.as_tensor(frac, dtype=torch.float32, device=s.h.device).detach()

    # ------------------------------------------------------------------ token-choice
    def _assign_depths(self, s: RecursionState) -> None:
        router, rt, nr = self.token_router, self.routing, self.layout.recursions
        logits, probs = router.probs(s.h)  # (B, T, Nr)
        scores = probs + router.bias if rt.balancing == "loss_free" else probs
        choice = scores.argmax(dim=-1)  # 0-based depth index
        if self.training and self.in_warmup:
            choice = torch.full_like(choice, nr - 1)
        s.assigned = choice + 1
        s.gate = probs.gather(-1, choice.unsqueeze(-1))
        s.h1, s.run = s.h, s.h
        load = F.one_hot(choice, nr).flatten(0, 1).float().sum(0)  # tokens per depth
        frac = load / choice.numel()
        for i in range(nr):
            s.stats[f"depth_load/d{i + 1}"] = frac[i].detach()
            s.stats[f"router_bias/d{i + 1}"] = router.bias[i].detach().clone()
        if s.mode == "topk" and torch.is_grad_enabled():
            if rt.balancing == "loss":
                # 0.1 * sum_i f_i P_i with f_i = Nr/T * tokens sent to i, P_i = mean prob of i -- the
                # gate-scaled probability (alpha * p), as the authors' code computes it: with the
                # sigmoid router (alpha 0.1) the loss is 10x smaller than with p itself.
                f_i = nr * frac
                p_i = probs.flatten(0, 1).mean(0)
                s.aux["balance"] = rt.balance_coef * (f_i.detach() * p_i).sum()
            if rt.z_loss_coef > 0:
                s.aux["router_z"] = rt.z_loss_coef * torch.logsumexp(logits, dim=-1).pow(2).mean()
        if s.mode == "topk" and self.training:
            router.pending_load += load.detach()

    def _token_route(self, r: int, s: RecursionState) -> None:
        d = s.h.shape[-1]
        active = s.assigned > r
        # The block runs at every recursion, on one padding slot per row when no token of this batch
        # is active: ZeRO-3 gathers the block's weights per call, so data-parallel ranks whose batches
        # differ must still make the same calls (skipping one hangs the others).
        order, valid = compact(active, min_width=1)
        self._record_active(r, s, active.float().mean())
        s.slots, s.slots_valid = order, valid
        s.x = s.run.gather(1, order.unsqueeze(-1).expand(-1, -1, d))

    def _token_merge(self, r: int, s: RecursionState) -> None:
        d = s.h.shape[-1]
        order, valid, out = s.slots, s.slots_valid, s.x
        if valid is not None:
            out = torch.where(valid.unsqueeze(-1), out, s.run.gather(1, order.unsqueeze(-1).expand(-1, -1, d)))
        s.run = s.run.scatter(1, order.unsqueeze(-1).expand(-1, -1, d), out)
        s.depth = s.depth + (s.assigned > r).long()
        if r == self.layout.recursions - 1:
            # Authors' update: H^1 + g_i * f^i(H^1), scaled once after the token's last recursion.
            s.h = s.h1 + s.gate.to(s.h.dtype) * s.run

    # ------------------------------------------------------------------ training hooks
    def load_buffers(self) -> list[torch.Tensor]:
        """Buffers the trainer sums across data-parallel ranks before after_optimizer_step()."""
        return [self.token_router.pending_load] if self.token_router is not None else []

    def _sync_host_step(self) -> None:
        """After a checkpoint load: the host copy of the step counter follows the loaded buffer."""
        self._set_host_step(int(self.train_step))

    def _set_host_step(self, step: int) -> None:
        self.host_step = step
        # Read by the forward instead of the counter: a bool that changes once (see _expert_route).
        self.in_warmup = step < self.warmup_steps

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.train_step += 1
        self._set_host_step(self.host_step + 1)
        if self.token_router is not None and self.routing.balancing == "loss_free":
            self.token_router.update_bias(self.routing.bias_update_rate)
        elif self.token_router is not None:
            self.token_router.pending_load.zero_()

    @torch.no_grad()
    def discard_step(self) -> None:
        """A step whose update was skipped (non-finite loss): forget its routing loads, count nothing."""
        if self.token_router is not None:
            self.token_router.pending_load.zero_()
