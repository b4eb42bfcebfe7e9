"""Continuous depth-wise batching (MOR.md 6): one batch of token slots for the shared block, filled
with tokens of many requests at different recursion depths.

A tick of the scheduler:
1. fill free slots from the queue of tokens that finished the unique first layers, FIFO;
2. run one recursion step of the shared block on every occupied slot at once -- each slot's
   attention reads its own request's cache at its own depth (ModelKVCache rows);
3. tokens whose router says exit (or that reached their last step) leave their slot; with the tokens
   that exited before the first step, they run the unique last layers and the head, batched;
4. each request appends its next token (greedy or sampled); a finished request frees its cache row,
   and waiting requests are admitted into free rows (their prompt prefilled as one chunk);
5. every request's new token runs embedding + unique first layers, batched, then the first router
   decision sends it to the queue (or straight to the exit list).
A request has at most one token in flight, so its tokens see exactly the caches that decoding it alone
would: the outputs equal generate() per request (tests/inference/test_batcher.py).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from mor_dist.model.layers import TokenFrame

from .decode import embed_prefix, expert_gate, forward_chunk, pick, suffix_logits, token_choice_depths
from .kv_cache import ModelKVCache


@dataclass
class Request:
    id: int
    prompt: list[int]
    max_new_tokens: int
    eos: int | None = None
    tokens: list[int] = field(default_factory=list)  # generated
    depths: list[int] = field(default_factory=list)  # recursion depth of each fed token
    logits: list[torch.Tensor] = field(default_factory=list)  # next-token logits, when kept
    row: int = -1
    pos: int = 0  # position of the next token to feed
    done: bool = False


@dataclass
class _Token:
    """A token between the unique first and last layers."""

    req: Request
    h: torch.Tensor  # (d,) expert/recursive: the residual stream; token-choice: f^r(h1)
    depth: int = 0  # recursion steps done
    logit: torch.Tensor | None = None  # expert-choice: router logit of the next step (its gate)
    h1: torch.Tensor | None = None  # token-choice: first unique layer's output
    gate: torch.Tensor | None = None  # token-choice: router probability of the chosen depth
    assigned: int = 0  # token-choice: chosen depth


class DepthWiseBatcher:
    """slots: tokens the shared block runs per tick; max_requests: concurrent requests (cache rows)."""

    def __init__(self, model, slots: int, max_requests: int, kv: str | None = None,
                 temperature: float = 0.0, seed: int = 0, keep_logits: bool = False):
        self.model, self.nr = model, model.layout.recursions
        self.slots: list[_Token | None] = [None] * max(slots, 1)
        self.cache = ModelKVCache(model, max_requests, kv)
        self.device = model.embed.weight.device
        self.temperature, self.keep_logits = temperature, keep_logits
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.free_rows = deque(range(max_requests))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admitted, not finished
        self.ready: list[Request] = []  # requests whose next token waits for the first layers
        self.queue: deque[_Token] = deque()  # tokens waiting for a slot, FIFO
        self.exited: list[_Token] = []  # tokens done with the shared block
        self.finished: dict[int, Request] = {}
        self.stats = {"ticks": 0, "slot_steps": 0, "generated": 0, "prefill_tokens": 0, "peak_kv_bytes": 0}
        self._next_id = 0

    # ------------------------------------------------------------------ public
    def submit(self, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> int:
        if not prompt or max_new_tokens < 1:
            raise ValueError("a request needs a non-empty prompt and max_new_tokens >= 1")
        limit = self.model.cfg.max_seq_len
        if len(prompt) + max_new_tokens - 1 > limit:
            raise ValueError(f"prompt of {len(prompt)} + {max_new_tokens} new tokens exceeds max_seq_len={limit}")
        req = Request(self._next_id, list(prompt), max_new_tokens, eos)
        self._next_id += 1
        self.waiting.append(req)
        return req.id

    @torch.no_grad()
    def run(self) -> dict[int, Request]:
        """Serve every submitted request to completion; returns them by id."""
        t0 = time.perf_counter()
        self._admit()
        self._enter()
        while self.running or self.waiting:
            self.tick()
        self.stats["seconds"] = time.perf_counter() - t0
        return self.finished

    @torch.no_grad()
    def tick(self) -> None:
        self._fill()
        self._shared_step()
        self._exit()
        self._admit()
        self._enter()
        self.stats["ticks"] += 1
        self.stats["peak_kv_bytes"] = max(self.stats["peak_kv_bytes"], self.cache.nbytes())

    # ------------------------------------------------------------------ stages
    def _fill(self) -> None:
        for i, s in enumerate(self.slots):
            if s is None and self.queue:
                self.slots[i] = self.queue.popleft()

    def _shared_step(self) -> None:
        model, nr = self.model, self.nr
        occupied = [i for i, s in enumerate(self.slots) if s is not None]
        if not occupied:
            return
        self.stats["slot_steps"] += len(occupied)
        # Slots whose steps apply the same shared layers run together (all of them under Cycle sharing).
        groups: dict[tuple, list[int]] = {}
        for i in occupied:
            groups.setdefault(model.layout.schedule[self.slots[i].depth], []).append(i)
        for members in groups.values():
            toks = [self.slots[i] for i in members]
            rows = torch.tensor([t.req.row for t in toks], device=self.device)
            depth = torch.tensor([t.depth for t in toks], device=self.device)
            pos = torch.tensor([[t.req.pos] for t in toks], device=self.device)
            x = torch.stack([t.h for t in toks])[:, None]
            frame = TokenFrame(pos, cache=self.cache.shared_views(rows, depth))
            out = model._run_block(toks[0].depth, x, frame)[:, 0]
            if model.token_router is not None:
                for t, o in zip(toks, out):
                    t.h, t.depth = o, t.depth + 1
            elif model.routers:
                new = expert_gate(model, x[:, 0], out, torch.stack([t.logit for t in toks]))
                for t, o in zip(toks, new):
                    t.h, t.depth = o, t.depth + 1
                self._route([t for t in toks if t.depth < nr])
            else:
                for t, o in zip(toks, out):
                    t.h, t.depth = o, t.depth + 1
        for i, t in enumerate(self.slots):
            if t is not None and self._leaves(t):  # its slot is free for the next tick's fill
                self.exited.append(t)
                self.slots[i] = None

    def _leaves(self, t: _Token) -> bool:
        if self.model.token_router is not None:
            return t.depth >= t.assigned
        if self.model.routers:
            return t.depth >= self.nr or t.logit is None
        return t.depth >= self.nr

    def _route(self, toks: list[_Token]) -> None:
        """Expert-choice: the router of each token's next step decides (logit > 0) whether it goes on."""
        by_depth: dict[int, list[_Token]] = {}
        for t in toks:
            by_depth.setdefault(t.depth, []).append(t)
        for r, group in by_depth.items():
            h = torch.stack([t.h for t in group])
            router = self.model.routers[r]
            logits = router(h)
            go = router.causal_logits(h, logits) > 0
            for t, lg, g in zip(group, logits, go.tolist()):
                t.logit = lg if g else None

    def _exit(self) -> None:
        """Unique last layers and head for the tokens done with the shared block; next tokens."""
        done, self.exited = self.exited, []
        if not done:
            return
        rows = torch.tensor([t.req.row for t in done], device=self.device)
        pos = torch.tensor([[t.req.pos] for t in done], device=self.device)
        h = torch.stack([t.h if t.h1 is None else t.h1 + t.gate.to(t.h.dtype) * t.h for t in done])[:, None]
        logits = suffix_logits(self.model, self.cache, rows, h, pos)[:, 0]
        nxt = pick(logits, self.temperature, self.gen).tolist()
        for t, lg, tok in zip(done, logits, nxt):
            t.req.depths.append(t.depth)
            t.req.pos += 1
            self._emit(t.req, tok, lg)

    def _emit(self, req: Request, tok: int, logits: torch.Tensor) -> None:
        req.tokens.append(tok)
        if self.keep_logits:
            req.logits.append(logits)
        self.stats["generated"] += 1
        if len(req.tokens) >= req.max_new_tokens or (req.eos is not None and tok == req.eos):
            req.done = True
            self.running.remove(req)
            self.cache.clear([req.row])
            self.free_rows.append(req.row)
            self.finished[req.id] = req
        else:
            self.ready.append(req)

    def _admit(self) -> None:
        """Waiting requests into free cache rows: prefill the prompt, pick its first token."""
        while self.waiting and self.free_rows:
            req = self.waiting.popleft()
            req.row = self.free_rows.popleft()
            self.running.append(req)
            n = len(req.prompt)
            rows = torch.tensor([req.row], device=self.device)
            x = torch.tensor([req.prompt], device=self.device)
            logits, depth = forward_chunk(self.model, self.cache, rows, x, torch.arange(n, device=self.device)[None])
            req.depths.extend(depth[0].tolist())
            req.pos = n
            self.stats["prefill_tokens"] += n
            self._emit(req, int(pick(logits[:, -1], self.temperature, self.gen)[0]), logits[0, -1])

    def _enter(self) -> None:
        """Each ready request's next token: embedding, unique first layers, first routing decision."""
        reqs, self.ready = self.ready, []
        if not reqs:
            return
        model = self.model
        rows = torch.tensor([r.row for r in reqs], device=self.device)
        x = torch.tensor([[r.tokens[-1]] for r in reqs], device=self.device)
        pos = torch.tensor([[r.pos] for r in reqs], device=self.device)
        h = embed_prefix(model, self.cache, rows, x, pos)[:, 0]
        toks = [_Token(r, hi) for r, hi in zip(reqs, h)]
        if self.nr == 0:
            self.exited.extend(toks)
            return
        if model.token_router is not None:
            assigned, gate = token_choice_depths(model, h)
            for t, a, g in zip(toks, assigned.tolist(), gate):
                t.h1, t.gate, t.assigned = t.h, g, a
        elif model.routers:
            self._route(toks)
        for t in toks:
            (self.exited if self._leaves(t) else self.queue).append(t)
