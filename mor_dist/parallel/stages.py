"""MoR's forward cut into pipeline stages, and the activation tuple that crosses each cut.

Mapping (MOR.md 2, Middle-Cycle): the first stage holds the embedding and the unique first layers;
the last stage holds the unique last layers, the final norm and the (tied) head; the shared block's
recursions go to the stages so that the slowest stage has the fewest FLOPs (a later recursion runs
fewer tokens, so it weighs less: stage_flops). parallel.stage_recursions pins how many recursions
each stage runs.

The routing state travels as fixed-shape tensors, so DeepSpeed sends shapes once:
    (h, [run, gate,] aux, depth, selected, [assigned])
Floating tensors come first: DeepSpeed 0.19.8 keeps ONE buffer pool, by tuple position, for received
activations and received gradients (the gradients list only the floating tensors) and reuses a
buffer without checking its dtype; with the integer tensors first, a middle stage received its aux
gradient into an int64 buffer (garbage gradients of ~1e18). Floats first keeps each position's dtype.
- selected (B, T) int64: expert-choice tokens chosen at the last step (all ones before step 1);
  the model's index form is rebuilt with compact(), which keeps original order.
- run, gate, assigned: token-choice state while recursions remain (h is then still H^1).
- aux (n_aux,) float: the routers' weighted aux losses so far, one slot per name; it reaches the
  loss on the last stage, so its gradient flows back to the router of whichever stage made it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mor_dist.model.mor import RecursionState
from mor_dist.model.routers import compact
from mor_dist.parallel.dims import ParallelLayoutError


def stage_plan(cfg) -> list[int]:
    """Recursions run by each pipeline stage: parallel.stage_recursions when pinned, else the plan
    whose slowest stage has the fewest training FLOPs (stage_flops)."""
    from mor_dist.model.layout import make_layout

    p, m = cfg.parallel, cfg.model
    nr = make_layout(m.n_layers, m.recursions, m.sharing, m.pad_layers).recursions
    pp = p.pipeline
    share = cfg.kv.strategy == "share"
    if p.stage_recursions is not None:
        plan = list(p.stage_recursions)
        if len(plan) != pp or sum(plan) != nr or min(plan) < 0:
            raise ParallelLayoutError(
                f"parallel.stage_recursions={plan} needs {pp} entries >= 0 summing to {nr} recursions"
            )
    else:
        candidates = [c for c in _plans(nr, pp) if not share or sum(1 for n in c if n) <= 1]
        if not candidates:
            raise ParallelLayoutError(
                f"parallel.pipeline={pp} leaves {pp - 2} middle stages for {nr} recursions"
                + (" (kv.strategy=share keeps them on one stage)" if share else "")
                + "; use fewer stages or pin parallel.stage_recursions"
            )
        plan = min(candidates, key=lambda c: (max(stage_flops(cfg, c)), c))
    if any(n == 0 for n in plan[1:-1]):
        raise ParallelLayoutError(f"parallel.stage_recursions={plan}: every middle stage needs a recursion")
    if share and sum(1 for n in plan if n) > 1:
        raise ParallelLayoutError(
            f"kv.strategy='share' with parallel.pipeline={pp} splits the recursions over stages {plan}; "
            "recursion 1's K/V would have to cross stages, which is not supported. Pin "
            f"parallel.stage_recursions so one stage runs all {nr} recursions, or use kv.strategy=recursion_wise"
        )
    return plan


def _plans(nr: int, pp: int):
    """Every split of the nr recursions, in order, over pp stages (middle stages non-empty)."""
    from itertools import combinations_with_replacement

    for cut in combinations_with_replacement(range(nr + 1), pp - 1):
        bounds = [0, *cut, nr]
        plan = [bounds[i + 1] - bounds[i] for i in range(pp)]
        if all(plan[1:-1]):
            yield plan


def stage_flops(cfg, plan: list[int]) -> list[float]:
    """Training FLOPs per token of each stage: the first holds the unique first layers, the last the
    unique last layers and the head (and loss), each stage its recursions at their capacities."""
    from mor_dist.model.accounting import forward_flops_pieces

    pieces = forward_flops_pieces(cfg)
    out, r = [], 0
    for s, n in enumerate(plan):
        f = sum(pieces["recursions"][r:r + n])
        r += n
        if s == 0:
            f += pieces["first"]
        if s == len(plan) - 1:
            f += pieces["last"] + pieces["head"]
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
def pack(state: RecursionState, names: list[str], base_aux: torch.Tensor | None, token_pending: bool) -> tuple:
    b, t = state.depth.shape
    if state.idx is None:
        selected = torch.ones(b, t, dtype=torch.long, device=state.h.device)
    else:
        keep = torch.ones_like(state.idx) if state.valid is None else state.valid.long()
        selected = torch.zeros(b, t, dtype=torch.long, device=state.h.device).scatter(1, state.idx, keep)
    aux = base_aux if base_aux is not None else state.h.new_zeros(len(names))
    new = [state.aux[n].reshape(1).to(aux.dtype) if n in state.aux else None for n in names]
    if any(v is not None for v in new):
        aux = aux + torch.cat([v if v is not None else aux.new_zeros(1) for v in new])
    if torch.is_grad_enabled() and not aux.requires_grad:
        # DeepSpeed runs backward on every float output of a stage: a stage that adds no aux loss
        # still sends a tensor that takes part in autograd (a leaf; its gradient is unused).
        aux = aux.detach().requires_grad_()
    if token_pending:
        gate = state.gate.to(state.h.dtype)
        return (state.h, state.run, gate, aux, state.depth, selected, state.assigned)
    return (state.h, aux, state.depth, selected)


def unpack(acts: tuple, mode: str, expert: bool) -> tuple[RecursionState, torch.Tensor]:
    if len(acts) == 7:  # token-choice recursions still to run
        h, run, gate, aux, depth, selected, assigned = acts
    else:
        (h, aux, depth, selected), run = acts, None
    b, t = depth.shape
    pos = torch.arange(t, device=h.device).expand(b, t)
    state = RecursionState(h=h, pos=pos, mode=mode, depth=depth)
    if expert and not bool(selected.bool().all()):
        state.idx, state.valid = compact(selected.bool())
    elif expert and int(depth.max()) > 0:  # every token selected at the last step
        state.idx = pos
    if run is not None:
        state.run, state.gate, state.assigned, state.h1 = run, gate, assigned, h
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
        return pack(state, self.names, None, token_pending=self.token_router is not None)


class Recursions(_ModelPiece):
    """Recursion steps [start, stop) of the shared block (weights in the tied layer before this one),
    with their expert-choice routers."""

    def __init__(self, model, names, start: int, stop: int):
        super().__init__(model, names)
        self.start, self.stop = start, stop
        self.routers = nn.ModuleList(list(model.routers)[start:stop])

    def forward(self, acts):
        state, aux = unpack(acts, self.mode, expert=len(self.model.routers) > 0)
        for r in range(self.start, self.stop):
            state = self.model.step(r, state)
        self.record(state.stats)
        pending = self.model.token_router is not None and self.stop < self.model.layout.recursions
        return pack(state, self.names, aux, token_pending=pending)


class LastStage(_ModelPiece):
    """Unique last layers, final norm and the head (the tied embedding, or model.head when untied).
    Returns (logits, aux, depth); the loss is the pipeline's loss_fn."""

    def __init__(self, model, names):
        super().__init__(model, names)
        self.suffix, self.norm, self.head = model.suffix, model.norm, model.head

    def forward(self, acts):
        state, aux = unpack(acts, self.mode, expert=len(self.model.routers) > 0)
        out = self.model.finish(state, None)
        return out.logits, aux, out.depth
