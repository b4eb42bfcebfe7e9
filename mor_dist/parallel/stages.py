"""MoR's forward cut into pipeline stages, and the activation tuple that crosses each cut.

Mapping (MOR.md 2, Middle-Cycle): the first stage holds the embedding and the unique first layers;
the last stage holds the unique last layers, the final norm and the (tied) head; the shared block's
passes (recursion r = the block's layers once, at that recursion's capacity) go to the stages so
that the slowest stage has the fewest FLOPs (a later recursion runs fewer tokens, so it weighs
less: stage_flops). Cuts fall between recursions unless one inside a recursion balances the
stages clearly better; the block stays tied across every stage that runs part of it.
parallel.stage_recursions / parallel.stage_layers pin the plan.

The routing state travels as fixed-shape tensors, so DeepSpeed sends shapes once:
    (h, [run, gate,] [part, [wgate,]] aux, depth, selected, [assigned])
Floating tensors come first: DeepSpeed 0.19.8 keeps ONE buffer pool, by tuple position, for received
activations and received gradients (the gradients list only the floating tensors) and reuses a
buffer without checking its dtype; with the integer tensors first, a middle stage received its aux
gradient into an int64 buffer (garbage gradients of ~1e18). Floats first keeps each position's dtype.
- selected (B, T) int64: between recursions, expert-choice tokens chosen at the last step (all ones
  before step 1); inside one, the tokens the step runs. The model's index form is rebuilt with
  compact(), which keeps original order.
- run, gate, assigned: token-choice state while recursions remain (h is then still H^1).
- part, wgate: inside a recursion, the block's partial output (B, T, d) and expert-choice's weighted
  gate (B, T), each at its tokens' places (the block's input is h there, unchanged until the merge);
  between recursions, one-element placeholders, so that the floats before aux are the same at every
  cut and no stage sends more floats than it receives (run and gate only ever stop). A plain
  recursive model runs every token and its output replaces h: h itself is the partial output.
- aux (n_aux,) float: the routers' weighted aux losses so far, one slot per name; it reaches the
  loss on the last stage, so its gradient flows back to the router of whichever stage made it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mor_dist.model.mor import RecursionState
from mor_dist.model.routers import compact
from mor_dist.parallel.dims import ParallelLayoutError


# A cut inside a recursion sends one more hidden-size activation (the partial block output) across
# the stage: the default plan takes one only when it makes the slowest stage this much lighter.
SPLIT_GAIN = 0.05


def shared_passes(cfg) -> tuple[int, int]:
    """(recursions, block layers): the shared-layer passes are recursions x block, in order."""
    from mor_dist.model.layout import make_layout

    m = cfg.model
    lay = make_layout(m.n_layers, m.recursions, m.sharing, m.pad_layers)
    return lay.recursions, lay.block


def stage_spans(plan: list[int], block: int) -> list[list[tuple[int, int, int]]]:
    """Per stage, the (recursion, first layer, end layer) spans its shared-layer passes cover."""
    out, u = [], 0
    for n in plan:
        spans, end = [], u + n
        while u < end:
            r, lo = divmod(u, block)
            hi = min(block, lo + end - u)
            spans.append((r, lo, hi))
            u += hi - lo
        out.append(spans)
    return out


def describe_plan(cfg, plan: list[int]) -> str:
    """Each stage's part of the recursions, 1-based: 'r1, r2 L1-4 / r2 L5-10, r3 / -'."""
    _, block = shared_passes(cfg)
    stages = []
    for spans in stage_spans(plan, block):
        parts = [f"r{r + 1}" if (lo, hi) == (0, block) else f"r{r + 1} L{lo + 1}" + (f"-{hi}" if hi - lo > 1 else "")
                 for r, lo, hi in spans]
        stages.append(", ".join(parts) or "-")
    return " / ".join(stages)


def stage_plan(cfg) -> list[int]:
    """Shared-layer passes run by each pipeline stage, in order (stage s runs passes sum(plan[:s]) up
    to sum(plan[:s+1]); recursion r is passes r*block .. (r+1)*block - 1). Pinned by
    parallel.stage_layers or parallel.stage_recursions; by default the plan whose slowest stage has
    the fewest training FLOPs (stage_flops), cut between recursions unless a cut inside one makes
    the slowest stage SPLIT_GAIN lighter."""
    p = cfg.parallel
    nr, block = shared_passes(cfg)
    pp = p.pipeline
    share = cfg.kv.strategy == "share"
    if p.stage_layers is not None:
        plan = list(p.stage_layers)
        if len(plan) != pp or sum(plan) != nr * block or min(plan) < 0:
            raise ParallelLayoutError(
                f"parallel.stage_layers={plan} needs {pp} entries >= 0 summing to {nr} x {block} = {nr * block} "
                "shared-layer passes"
            )
        pinned = f"parallel.stage_layers={plan}"
    elif p.stage_recursions is not None:
        plan = list(p.stage_recursions)
        if len(plan) != pp or sum(plan) != nr or min(plan) < 0:
            raise ParallelLayoutError(
                f"parallel.stage_recursions={plan} needs {pp} entries >= 0 summing to {nr} recursions"
            )
        pinned = f"parallel.stage_recursions={plan}"
        plan = [n * block for n in plan]
    else:
        aligned = [[n * block for n in c] for c in recursion_splits(nr, pp)
                   if not share or sum(1 for n in c if n) <= 1]
        split = None if share else _balanced_cuts(cfg, pp)  # KV sharing keeps the recursions together
        if not aligned and split is None:
            raise ParallelLayoutError(
                f"parallel.pipeline={pp} leaves {pp - 2} middle stages for {nr} recursions"
                + (" (kv.strategy=share keeps them on one stage)" if share else f" of {block} layers")
                + ("; use fewer stages or pin parallel.stage_recursions" if share else "; use fewer stages")
            )
        plan = min(aligned, key=lambda c: (max(stage_flops(cfg, c)), c)) if aligned else split
        if split is not None and max(stage_flops(cfg, split)) * (1 + SPLIT_GAIN) < max(stage_flops(cfg, plan)):
            plan = split
        pinned = None  # both searches keep every middle stage busy
    if pinned and any(n == 0 for n in plan[1:-1]):
        raise ParallelLayoutError(f"{pinned}: every middle stage needs a shared layer to run")
    if share and sum(1 for n in plan if n) > 1:
        raise ParallelLayoutError(
            f"kv.strategy='share' with parallel.pipeline={pp} splits the recursions over stages {plan}; "
            "recursion 1's K/V would have to cross stages, which is not supported. Pin "
            f"parallel.stage_recursions so one stage runs all {nr} recursions, or use kv.strategy=recursion_wise"
        )
    return plan


def recursion_splits(nr: int, pp: int):
    """Every split of the nr recursions, in order, over pp stages (middle stages non-empty)."""
    from itertools import combinations_with_replacement

    for cut in combinations_with_replacement(range(nr + 1), pp - 1):
        bounds = [0, *cut, nr]
        plan = [bounds[i + 1] - bounds[i] for i in range(pp)]
        if all(plan[1:-1]):
            yield plan


def _unit_flops(cfg) -> tuple[float, list[float], float]:
    """Forward FLOPs per token: (first stage's own, each shared-layer pass, last stage's own).
    A recursion's router goes with its first pass (the stage that routes it)."""
    from mor_dist.model.accounting import forward_flops_pieces, router_flops

    nr, block = shared_passes(cfg)
    pieces = forward_flops_pieces(cfg)
    units = []
    for r, f in enumerate(pieces["recursions"]):
        router = router_flops(cfg, r)
        units += [router + (f - router) / block] + [(f - router) / block] * (block - 1)
    return pieces["first"], units, pieces["last"] + pieces["head"]


def _balanced_cuts(cfg, pp: int) -> list[int] | None:
    """The split of the shared-layer passes over pp stages (middle stages non-empty) whose slowest
    stage has the fewest FLOPs: a min-max partition by dynamic programming."""
    first, units, last = _unit_flops(cfg)
    n = len(units)
    prefix = [0.0]
    for u in units:
        prefix.append(prefix[-1] + u)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(pp)]  # best[s][i]: stages 0..s over passes [0, i)
    arg = [[0] * (n + 1) for _ in range(pp)]
    for i in range(n + 1):
        best[0][i] = first + prefix[i] + (last if pp == 1 else 0.0)
    for s in range(1, pp):
        ends = [n] if s == pp - 1 else range(n + 1)
        for i in ends:
            for j in range(i + 1):
                if s < pp - 1 and j == i:  # a middle stage needs a pass
                    continue
                seg = prefix[i] - prefix[j] + (last if s == pp - 1 else 0.0)
                v = max(best[s - 1][j], seg)
                if v < best[s][i] - 1e-9 * abs(v):
                    best[s][i], arg[s][i] = v, j
    if best[pp - 1][n] == inf:
        return None
    cuts, i = [], n
    for s in range(pp - 1, 0, -1):
        i = arg[s][i]
        cuts.append(i)
    bounds = [0, *reversed(cuts), n]
    return [bounds[k + 1] - bounds[k] for k in range(pp)]


def stage_flops(cfg, plan: list[int]) -> list[float]:
    """Training FLOPs per token of each stage (plan in shared-layer passes): the first holds the
    unique first layers, the last the unique last layers and the head (and loss), each stage its
    passes at their recursions' capacities."""
    first, units, last = _unit_flops(cfg)
    out, u = [], 0
    for s, n in enumerate(plan):
        f = sum(units[u:u + n])
        u += n
        if s == 0:
            f += first
        if s == len(plan) - 1:
            f += last
        out.append(3.0 * f)
    return out


def aux_names(model, seq_len: int) -> list[str]:
    """Names of the aux losses a training forward produces, from a tiny dry run (grad on, eval mode so
    no load or warmup counter moves)."""
    was = model.training
    model.eval()
    with torch.enable_grad():
        t = min(seq_len, 8)
        tokens = torch.zeros(1, t, dtype=torch.long, device=model.embed.weight.device)
        state = model.begin(tokens, "topk")
        for r in range(model.layout.recursions):
            state = model.step(r, state)
    model.train(was)
    return sorted(state.aux)


# ---------------------------------------------------------------------- state <-> tuple
def _cut(model, at: int) -> tuple[bool, bool, bool, bool, bool]:
    """What crosses the cut before shared-layer pass `at`: (expert, weighted gate, plain recursion
    (no router), token-choice state pending, inside a recursion)."""
    lay = model.layout
    expert = len(model.routers) > 0
    weighted = expert and model.routing.gating == "weighted"
    plain = not expert and model.token_router is None
    token_pending = model.token_router is not None and at < lay.recursions * lay.block
    return expert, weighted, plain, token_pending, at % max(lay.block, 1) != 0


def _marks(b: int, t: int, idx, valid, device) -> torch.Tensor:
    """(B, T) int64: 1 at the given slots (their valid ones), else 0; all ones for idx None."""
    if idx is None:
        return torch.ones(b, t, dtype=torch.long, device=device)
    keep = torch.ones_like(idx) if valid is None else valid.long()
    return torch.zeros(b, t, dtype=torch.long, device=device).scatter(1, idx, keep)


def _in_autograd(x: torch.Tensor) -> torch.Tensor:
    # DeepSpeed runs backward on every float output of a stage: one that carries no gradient path
    # (a stage adding no aux loss, a gate that is zeros) is sent as a leaf that takes part in it.
    return x.detach().requires_grad_() if torch.is_grad_enabled() and not x.requires_grad else x


def pack(state: RecursionState, names: list[str], base_aux: torch.Tensor | None, model, at: int) -> tuple:
    """The state at the cut before shared-layer pass `at`, as the activation tuple."""
    expert, weighted, plain, token_pending, mid = _cut(model, at)
    b, t = state.depth.shape
    h, dev = state.h, state.h.device
    aux = base_aux if base_aux is not None else h.new_zeros(len(names))
    new = [state.aux[n].reshape(1).to(aux.dtype) if n in state.aux else None for n in names]
    if any(v is not None for v in new):
        aux = aux + torch.cat([v if v is not None else aux.new_zeros(1) for v in new])
    if mid and plain:  # every token runs the block and its output replaces h: the partial output is h
        h = state.x
    floats = [h]
    if token_pending:
        floats += [state.run, state.gate.to(h.dtype)]
    if not plain:
        if mid:
            # The step's partial block output, scattered to the tokens' places (fixed shapes): the
            # next stage gathers it back at the same slots, rebuilt from `selected`.
            slots = state.slots
            part = torch.zeros_like(h)
            if state.x is not None:
                part = part.scatter(1, slots.unsqueeze(-1).expand(-1, -1, h.shape[-1]), state.x)
            wgate = torch.zeros(b, t, dtype=h.dtype, device=dev) if weighted else None
            if weighted and state.wgate is not None:
                wgate = wgate.scatter(1, slots, state.wgate.to(h.dtype))
            # No token in this step (causal mode, every token exited): nothing selected.
            selected = (_marks(b, t, slots, state.slots_valid, dev) if state.x is not None
                        else torch.zeros(b, t, dtype=torch.long, device=dev))
        else:
            # Between recursions: one-element placeholders in the same places, so that every cut has
            # the same floats before aux (a middle stage starting between recursions and ending
            # inside one would otherwise receive gradients into its int64 buffers: see above).
            part, wgate = h.new_zeros(1), h.new_zeros(1) if weighted else None
            selected = _marks(b, t, state.idx, state.valid, dev)
        floats.append(_in_autograd(part))
        if weighted:
            floats.append(_in_autograd(wgate))
    elif mid:  # plain recursion inside a step: every token
        selected = _marks(b, t, None, None, dev)
    else:
        selected = _marks(b, t, state.idx, state.valid, dev)
    floats.append(_in_autograd(aux))
    return (*floats, state.depth, selected, *([state.assigned] if token_pending else []))


def unpack(acts: tuple, mode: str, model, at: int) -> tuple[RecursionState, torch.Tensor]:
    """The tuple pack() made at the same cut, back to a state (and the aux losses so far)."""
    expert, weighted, plain, token_pending, mid = _cut(model, at)
    acts = list(acts)
    h = acts.pop(0)
    run, gate = (acts.pop(0), acts.pop(0)) if token_pending else (None, None)
    part = acts.pop(0) if not plain else None
    wgate = acts.pop(0) if weighted else None
    aux, depth, selected = acts.pop(0), acts.pop(0), acts.pop(0)
    if part is not None and not mid:
        # Placeholders take part in autograd (zero gradients), so DeepSpeed has one to send back.
        aux = aux + 0.0 * (part.sum() + (wgate.sum() if wgate is not None else 0.0))
    assigned = acts.pop(0) if token_pending else None
    b, t = depth.shape
    pos = torch.arange(t, device=h.device).expand(b, t)
    state = RecursionState(h=h, pos=pos, mode=mode, depth=depth)
    if run is not None:
        state.run, state.gate, state.assigned, state.h1 = run, gate, assigned, h
    if mid:
        if not plain:
            # The route's slots: ascending positions, padded as the route padded (compact).
            slots, valid = compact(selected.bool(), min_width=1)
            state.slots, state.slots_valid = slots, valid
            state.x = part.gather(1, slots.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            if expert:
                state.idx, state.valid = slots, valid
            if wgate is not None:
                state.wgate = wgate.gather(1, slots)
        else:  # plain recursion: h is the partial output (pack)
            state.x = h
    elif expert and not bool(selected.bool().all()):
        state.idx, state.valid = compact(selected.bool())
    elif expert and int(depth.max()) > 0:  # every token selected at the last step
        state.idx = pos
    return state, aux


# ---------------------------------------------------------------------- stage layers
class _ModelPiece(nn.Module):
    """A stage layer: runs part of the model's forward; registers only the submodules it owns."""

    def __init__(self, model, names: list[str]):
        super().__init__()
        self._model = [model]  # a list hides it from nn.Module: its other parts are not ours
        self.names = names
        # The optimizer-step counter drives warmups on every stage and is saved with each stage.
        self.register_buffer("train_step", model.train_step)
        self.stats: dict = {}  # routing stats summed over this step's micro-batches (train_step resets)

    @property
    def model(self):
        return self._model[0]

    @property
    def mode(self) -> str:
        return "topk" if self.training else "causal"

    def record(self, stats: dict) -> None:
        if self.training:
            for k, v in stats.items():
                self.stats[k] = self.stats.get(k, 0.0) + float(v)


class TiedWeights(nn.Module):
    """Weights held by several stages (the embedding/head, the shared block). DeepSpeed sums their
    gradients over the stages that hold them, so the copies never drift; activations pass through."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return x


class FirstStage(_ModelPiece):
    """Embedding (its weight registered by the tied layer before this one), unique first layers and
    the token-choice router."""

    def __init__(self, model, names):
        super().__init__(model, names)
        self.prefix = model.prefix
        self.token_router = model.token_router

    def forward(self, tokens):
        state = self.model.begin(tokens, self.mode)
        self.record(state.stats)
        return pack(state, self.names, None, self.model, at=0)


class Recursions(_ModelPiece):
    """Shared-layer passes [start, stop) (recursion r is passes r*block .. (r+1)*block - 1; the
    block's weights are in the tied layer before this one), with the expert routers of the
    recursions that start here. A cut may fall inside a recursion: the state then crosses it."""

    def __init__(self, model, names, start: int, stop: int):
        super().__init__(model, names)
        self.start, self.stop = start, stop
        block = model.layout.block
        self.spans = stage_spans([start, stop - start], block)[1]
        self.routers = nn.ModuleList([model.routers[r] for r, lo, _ in self.spans if lo == 0] if model.routers else [])

    def forward(self, acts):
        state, aux = unpack(acts, self.mode, self.model, at=self.start)
        for r, lo, hi in self.spans:
            state = self.model.step(r, state, (lo, hi))
        self.record(state.stats)
        return pack(state, self.names, aux, self.model, at=self.stop)


class LastStage(_ModelPiece):
    """Unique last layers, final norm and the head (the tied embedding, or model.head when untied).
    Returns (logits, aux, depth); the loss is the pipeline's loss_fn."""

    def __init__(self, model, names):
        super().__init__(model, names)
        self.suffix, self.norm, self.head = model.suffix, model.norm, model.head

    def forward(self, acts):
        lay = self.model.layout
        state, aux = unpack(acts, self.mode, self.model, at=lay.recursions * lay.block)
        out = self.model.finish(state, None)
        return out.logits, aux, out.depth
