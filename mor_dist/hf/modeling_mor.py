"""Mixture-of-Recursions for Hugging Face transformers (trust_remote_code), written by `mor export --hf`.

Self-contained: torch and transformers only. Parameter names are mor_dist's own (embed, prefix.*,
shared.*, suffix.*, norm, head, routers.*, token_router.*), so one model.safetensors serves both
`mor generate` and `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.

Every forward makes the routing decisions mor makes at inference (its causal mode), so a token's
depth depends only on itself and earlier tokens:
- expert-choice: before step r the router of step r scores the tokens still recursing; a token goes
  on while its causal logit is > 0 (sigmoid > 0.5; the aux router's when causal_method=aux_router)
  and gets h + alpha * sigmoid(logit) * f(h); once stopped it stays stopped (hierarchical);
- token-choice: one router after the unique first layers picks depth = argmax (+ the loss-free bias);
  the token runs f that many times and leaves with h1 + g * f^depth(h1);
- recursive (no router): every token, every step; vanilla: no recursion.
Selected tokens are gathered into a compact tensor (RoPE at their original positions), run through
the shared block and scattered back, as mor does.

KV cache (MoRCache, a transformers Cache): one MoRCacheLayer per attention call site -- each unique
layer; each shared-block slot j at each depth r (kv_strategy=recursion_wise: a token's K/V are
stored only at the depths it reaches, and a token at depth r attends only to earlier tokens that
reached r); or each slot j once (kv_strategy=share: recursion 1's K/V, reused by every depth, whose
layers then compute queries only). A layer stores K/V densely over the sequence with a mask of the
entries actually written, so padding and tokens that never reached a depth are never attended to.
The whole forward pass -- a prompt, one token, or a full sequence without a cache -- runs through
the same cache code, so cached decoding and a full forward make the same decisions.

Padding: an attention_mask marks padding tokens, which write no K/V and take no routing decision;
positions count real tokens only (left padding, as batched generation uses, gives every row the
positions it would have alone).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mor import MoRConfig


# ---------------------------------------------------------------------------------------- layout
def layer_layout(config: MoRConfig) -> tuple[int, int, int, list[list[int]]]:
    """(prefix layers, shared-block layers B, suffix layers, schedule): schedule[r] lists the shared
    layers that recursion step r applies (Cycle: 0..B-1 every step; Sequence: each shared layer Nr
    times in a row, B entries a step)."""
    L, nr, sharing = config.num_hidden_layers, config.recursions, config.sharing
    if sharing == "none":
        return L, 0, 0, []
    edge = 1 if sharing.startswith("middle") else 0
    shared_depth = L - 2 * edge
    block = -(-shared_depth // nr) if config.pad_layers else shared_depth // nr
    if sharing.endswith("cycle"):
        schedule = [list(range(block)) for _ in range(nr)]
    else:
        schedule = [[(r * block + j) // nr for j in range(block)] for r in range(nr)]
    return edge, block, edge, schedule


# ---------------------------------------------------------------------------------------- cache
class MoRCacheLayer(CacheLayerMixin):
    """K/V of one attention call site for every token fed so far (dense over the sequence), and
    `written` (batch, seq): which tokens stored theirs here."""

    is_croppable = True
    supports_early_init = False

    def __init__(self, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.written: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b = key_states.shape[0]
        self.keys = key_states.new_zeros(b, self.n_kv_heads, 0, self.head_dim)
        self.values = value_states.new_zeros(b, self.n_kv_heads, 0, self.head_dim)
        self.written = torch.zeros(b, 0, dtype=torch.bool, device=key_states.device)
        self.device = key_states.device
        self.is_initialized = True

    def extend(self, batch: int, new: int, dtype, device) -> None:
        """Room for `new` tokens, none of them written yet."""
        if not self.is_initialized:
            self.lazy_initialization(torch.zeros(batch, 0, dtype=dtype, device=device),
                                     torch.zeros(batch, 0, dtype=dtype, device=device))
        b, h, _, d = self.keys.shape
        self.keys = torch.cat([self.keys, self.keys.new_zeros(b, h, new, d)], dim=2)
        self.values = torch.cat([self.values, self.values.new_zeros(b, h, new, d)], dim=2)
        self.written = torch.cat([self.written, self.written.new_zeros(b, new)], dim=1)

    def write(self, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor, keep: torch.Tensor | None) -> None:
        """k, v: (batch, Hkv, K, D) of gathered tokens at sequence slots `slot` (batch, K); keep:
        (batch, K) False on padding slots of the gather, which write nothing."""
        if keep is None:
            keep = torch.ones_like(slot, dtype=torch.bool)
        bi, ki = keep.nonzero(as_tuple=True)
        si = slot[bi, ki]
        self.keys[bi, :, si] = k[bi, :, ki].to(self.keys.dtype)
        self.values[bi, :, si] = v[bi, :, ki].to(self.values.dtype)
        self.written[bi, si] = True

    def update(self, key_states, value_states, *args, **kwargs):
        """The generic Cache API: append K/V of new tokens, all written."""
        b, _, t, _ = key_states.shape
        start = self.get_seq_length()
        self.extend(b, t, key_states.dtype, key_states.device)
        slot = torch.arange(start, start + t, device=key_states.device).expand(b, t)
        self.write(key_states, value_states, slot, None)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.keys.shape[2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.written = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]
            self.written = self.written[indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
            self.written = self.written.repeat_interleave(repeats, dim=0)

    def crop(self, tokens_to_remove: int) -> None:
        if self.is_initialized and tokens_to_remove > 0:
            keep = max(0, self.get_seq_length() - tokens_to_remove)
            self.keys, self.values = self.keys[:, :, :keep], self.values[:, :, :keep]
            self.written = self.written[:, :keep]


class MoRCache(Cache):
    """The call sites of one model, in order: unique first layers, shared slots (per depth under
    recursion_wise, once under share), unique last layers."""

    def __init__(self, config: MoRConfig):
        prefix, block, suffix, _ = layer_layout(config)
        per_depth = config.kv_strategy == "recursion_wise"
        self.prefix_n, self.block, self.per_depth = prefix, block, per_depth
        shared = block * (config.recursions if per_depth and block else 1 if block else 0)
        n = prefix + shared + suffix
        super().__init__(layers=[MoRCacheLayer(config.num_key_value_heads, config.head_dim) for _ in range(n)])
        self.suffix_start = prefix + shared

    def extend(self, batch: int, new: int, dtype, device) -> None:
        for layer in self.layers:
            layer.extend(batch, new, dtype, device)

    def prefix_site(self, i: int) -> MoRCacheLayer:
        return self.layers[i]

    def shared_site(self, j: int, r: int) -> MoRCacheLayer:
        return self.layers[self.prefix_n + (r * self.block + j if self.per_depth else j)]

    def suffix_site(self, i: int) -> MoRCacheLayer:
        return self.layers[self.suffix_start + i]


# ---------------------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in fp32, as mor does
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """RoPE (rotate-half) indexed by original position; fp32 tables built per device, not buffers,
    with mor's arithmetic so results agree to the last bit."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self._tables: dict = {}

    def tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._tables:
            inv_freq = 1.0 / (self.theta ** (
                torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim))
            freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32, device=device), inv_freq)
            self._tables[key] = (freqs.cos(), freqs.sin())
        return self._tables[key]

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if pos.numel() and int(pos.max()) >= self.max_positions:
            raise ValueError(f"position {int(pos.max())} exceeds max_position_embeddings={self.max_positions}")
        cos_t, sin_t = self.tables(x.device)
        cos, sin = cos_t[pos].unsqueeze(1), sin_t[pos].unsqueeze(1)
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class Frame:
    """Tokens of one layer call: positions (RoPE), slots (index in the cache's sequence), valid
    (False on padding slots of a gather, or None), the cache site and whether this call writes K/V
    there (False: KV sharing's later recursions, which read recursion 1's)."""

    def __init__(self, pos, slot, valid, site: MoRCacheLayer, writes: bool = True):
        self.pos, self.slot, self.valid, self.site, self.writes = pos, slot, valid, site, writes


class Attention(nn.Module):
    def __init__(self, config: MoRConfig, rope: RotaryEmbedding):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.head_dim = hd
        self.wq = nn.Linear(d, config.num_attention_heads * hd, bias=False)
        self.wk = nn.Linear(d, config.num_key_value_heads * hd, bias=False)
        self.wv = nn.Linear(d, config.num_key_value_heads * hd, bias=False)
        self.wo = nn.Linear(config.num_attention_heads * hd, d, bias=False)
        self.rope = rope

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, k, _ = x.shape
        return x.view(b, k, -1, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, f: Frame) -> torch.Tensor:
        q = self.rope(self._heads(self.wq(x)), f.pos)
        if f.writes:  # K/V of these tokens go into the cache first: a token sees itself
            f.site.write(self.rope(self._heads(self.wk(x)), f.pos), self._heads(self.wv(x)), f.slot, f.valid)
        keys, values, written = f.site.keys, f.site.values, f.site.written
        seq = torch.arange(keys.shape[2], device=x.device)
        mask = written[:, None, :] & (seq[None, None, :] <= f.slot[:, :, None])  # (B, K, S), causal by slot
        # A query with no key at all (a padding slot) would give NaN: let it attend anywhere, it is discarded.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
        out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask[:, None],
                                             enable_gqa=q.shape[1] != keys.shape[1])
        b, _, n, _ = out.shape
        return self.wo(out.transpose(1, 2).reshape(b, n, -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class TransformerLayer(nn.Module):
    def __init__(self, config: MoRConfig, rope: RotaryEmbedding):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, rope)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, f: Frame) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), f)
        return h + self.mlp(self.mlp_norm(h))


def router_net(d_model: int, out_dim: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_model, out_dim, bias=False)
    return nn.Sequential(nn.Linear(d_model, 2 * d_model, bias=False), nn.GELU(),
                         nn.Linear(2 * d_model, out_dim, bias=False))


class ExpertChoiceRouter(nn.Module):
    def __init__(self, d_model: int, kind: str, aux_router: bool):
        super().__init__()
        self.net = router_net(d_model, 1, kind)
        self.aux_net = router_net(d_model, 1, kind) if aux_router else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).squeeze(-1)

    def causal_logits(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.aux_net is None else self.aux_net(h).squeeze(-1)


class TokenChoiceRouter(nn.Module):
    def __init__(self, d_model: int, recursions: int, kind: str):
        super().__init__()
        self.net = router_net(d_model, recursions, kind)
        self.register_buffer("bias", torch.zeros(recursions))  # loss-free balancing: added for the choice only


def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Indices of the kept entries of each row, in order, padded to the longest row; valid marks
    real entries (None when no row needed padding). Padding points at distinct dropped entries."""
    k_max = int(keep.sum(dim=1).max()) if keep.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k_max]
    valid = keep.gather(1, order)
    return order, (None if bool(valid.all()) else valid)


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter(x: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return x.scatter(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), src)


# ---------------------------------------------------------------------------------------- model
class MoRPreTrainedModel(PreTrainedModel):
    config_class = MoRConfig
    config: MoRConfig
    base_model_prefix = "mor"
    supports_gradient_checkpointing = False
    _no_split_modules = ["TransformerLayer"]
    # Training-time state mor saves beside the weights; inference does not use it.
    _keys_to_ignore_on_load_unexpected = [r"train_step", r"pending_load"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not hand us a DynamicCache: the model makes its own MoRCache


class MoRForCausalLM(MoRPreTrainedModel, GenerationMixin):
    def __init__(self, config: MoRConfig):
        super().__init__(config)
        c = config
        self.prefix_n, self.block, self.suffix_n, self.schedule = layer_layout(c)
        self.nr = len(self.schedule)
        self.rope = RotaryEmbedding(c.head_dim, c.max_position_embeddings, c.rope_theta)
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.prefix = nn.ModuleList(TransformerLayer(c, self.rope) for _ in range(self.prefix_n))
        self.shared = nn.ModuleList(TransformerLayer(c, self.rope) for _ in range(self.block))  # ONE block, reused
        self.suffix = nn.ModuleList(TransformerLayer(c, self.rope) for _ in range(self.suffix_n))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.routers = nn.ModuleList()
        self.token_router = None
        if c.routing_type == "expert":
            self.routers.extend(ExpertChoiceRouter(c.hidden_size, c.router, c.causal_method == "aux_router")
                                for _ in range(self.nr))
        elif c.routing_type == "token":
            self.token_router = TokenChoiceRouter(c.hidden_size, self.nr, c.router)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    # ------------------------------------------------------------------ pieces
    def _block(self, r: int, x: torch.Tensor, pos, slot, valid, cache: MoRCache) -> torch.Tensor:
        """f at recursion step r on gathered tokens x (batch, K, d)."""
        share = self.config.kv_strategy == "share"
        for j, li in enumerate(self.schedule[r]):
            site = cache.shared_site(j, r)
            x = self.shared[li](x, Frame(pos, slot, valid, site, writes=not share or r == 0))
        return x

    def _expert(self, h, pos, slot, real, cache):
        b, t, _ = h.shape
        cand = torch.arange(t, device=h.device).expand(b, t)
        cand_valid = real
        for r in range(self.nr):
            if cand.shape[1] == 0:
                break
            router = self.routers[r]
            h_c = gather(h, cand)
            logits = router(h_c)
            keep = router.causal_logits(h_c, logits) > 0  # sigmoid > 0.5: one step deeper
            if cand_valid is not None:
                keep = keep & cand_valid
            sel, valid = compact(keep)
            cand, cand_valid = cand.gather(1, sel), valid
            if cand.shape[1] == 0:
                break
            x = gather(h, cand)
            out = self._block(r, x, pos.gather(1, cand), slot.gather(1, cand), valid, cache)
            if self.config.gating == "weighted":
                g = self.config.router_alpha * torch.sigmoid(logits.gather(1, sel))
                out = x + g.unsqueeze(-1).to(x.dtype) * out
            if valid is not None:
                out = torch.where(valid.unsqueeze(-1), out, x)
            h = scatter(h, cand, out)
        return h

    def _token(self, h, pos, slot, real, cache):
        c, router = self.config, self.token_router
        logits = router.net(h).float()
        p = torch.softmax(logits, dim=-1) if c.token_func == "softmax" else torch.sigmoid(logits)
        probs = c.router_alpha * p
        scores = probs + router.bias if c.balancing == "loss_free" else probs
        choice = scores.argmax(dim=-1)
        assigned, gate = choice + 1, probs.gather(-1, choice.unsqueeze(-1))
        run = h
        for r in range(self.nr):
            active = assigned > r if real is None else (assigned > r) & real
            order, valid = compact(active)
            if order.shape[1]:
                x = gather(run, order)
                out = self._block(r, x, pos.gather(1, order), slot.gather(1, order), valid, cache)
                if valid is not None:
                    out = torch.where(valid.unsqueeze(-1), out, x)
                run = scatter(run, order, out)
        return h + gate.to(h.dtype) * run

    def _positions(self, attention_mask, position_ids, past: int, b: int, t: int, device):
        slot = torch.arange(past, past + t, device=device).expand(b, t)
        real = None
        if attention_mask is not None:
            real = attention_mask[:, -t:].bool()
            if bool(real.all()):
                real = None
        if position_ids is not None:
            pos = position_ids[:, -t:].to(device)
        elif attention_mask is not None:
            # Real tokens count 0, 1, 2, ... whatever padding precedes them.
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:].to(device)
        else:
            pos = slot
        return pos.expand(b, t), slot, real

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not isinstance(cache, MoRCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("MoR needs its own MoRCache (K/V per recursion depth); pass the cache this "
                                 "model returned")
            cache = MoRCache(self.config)
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = h.shape
        past = cache.get_seq_length()
        pos, slot, real = self._positions(attention_mask, position_ids, past, b, t, h.device)
        cache.extend(b, t, h.dtype, h.device)

        for i, layer in enumerate(self.prefix):
            h = layer(h, Frame(pos, slot, real, cache.prefix_site(i)))
        if self.token_router is not None:
            h = self._token(h, pos, slot, real, cache)
        elif self.routers:
            h = self._expert(h, pos, slot, real, cache)
        else:  # recursive: every token, every step
            for r in range(self.nr):
                h = self._block(r, h, pos, slot, real, cache)
        for i, layer in enumerate(self.suffix):
            h = layer(h, Frame(pos, slot, real, cache.suffix_site(i)))
        h = self.norm(h)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = F.linear(h, self.embed.weight) if self.head is None else self.head(h)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)


__all__ = ["MoRCache", "MoRForCausalLM", "MoRPreTrainedModel"]
