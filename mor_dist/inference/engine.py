"""Continuous depth-wise batching (MOR.md 6) over paged KV caches: the serving engine.

Every admitted request owns a row: a cache row and a slot of the shared block. A request has one
token in flight; the shared block runs once per tick over every row whose token is still
recursing, whatever its depth -- tokens of different requests at different depths in one call, the
batch staying full while single tokens exit early. One tick:

1. prefill: prompt chunks of newly admitted requests, up to `prefill_tokens` per tick, run through
   the model into their caches (prefill.py); a prompt's last token is not prefilled but decoded;
2. exit: rows whose token finished its recursions (known from the previous tick) run the unique
   last layers, the norm and the head; the next token is sampled on the device;
3. entry: those rows' sampled tokens (and the last prompt token of requests whose prefill just
   ended) run the embedding and the unique first layers and get their first routing decision;
4. shared block: one recursion step for every row that goes on (static shape: all rows, masked),
   each attending to its own request's cache at its own depth, then the next routing decision;
5. one device-to-host copy: the sampled tokens and the routing flags. The host then records tokens,
   finishes requests (length, EOS), plans the next tick and reserves its pages.

A token that goes no deeper leaves at the next tick's exit. All routing decisions are the causal
ones (MoRModel's causal mode), so each request's tokens, depths and logits equal one full causal
forward of its sequence (tests/inference/test_engine.py). When the page pool runs out, the request
admitted last is preempted: its pages are freed and it is recomputed later from its tokens so far.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from mor_dist.model.layers import TokenFrame

from .packed_linear import PackedWeight, pack_linears, unpack_linears
from .paged_cache import CacheFullError, PagedKVCache
from .prefill import prefill_chunk, run_unique, token_choice_depths


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
    cached: int = 0  # tokens of feed() in the cache (prefilled or decoded)
    admitted: float | None = None  # engine clock when it got a row (the first time)
    token_times: list[float] = field(default_factory=list)  # engine clock at each generated token
    preemptions: int = 0
    done: bool = False

    def feed(self) -> list[int]:
        """Every token this request's cache must hold before its next one is sampled."""
        return self.prompt + self.tokens


def pick(logits: torch.Tensor, temperature: float = 0.0, generator=None) -> torch.Tensor:
    """Next token from last-position logits (n, V): greedy at temperature 0, else sampled."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    # Inverse-CDF sampling: one uniform draw per row. torch.multinomial draws an exponential per
    # vocabulary entry, ~3% of a decode tick on the CPU at a 4096-entry vocabulary. side="right"
    # never lands on a zero-probability entry (its CDF equals its predecessor's).
    cdf = torch.softmax(logits.float() / temperature, dim=-1).cumsum(dim=-1)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device) * cdf[..., -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


class ServingEngine:
    """max_requests: rows (concurrent requests); page_size, kv_pages: the paged cache (kv_pages:
    pages per group, default enough for every row at max_seq_len); prefill_tokens: prompt tokens per
    tick; width_bucket: pages read per block call rounded up to a multiple of it (fewer shapes for
    torch.compile); pack_weights: prepack the model's Linear weights for oneDNN (packed_linear.py;
    default on a CPU device)."""

    def __init__(self, model, max_requests: int, kv: str | None = None, page_size: int = 16,
                 kv_pages: dict | None = None, prefill_tokens: int = 256, temperature: float = 0.0, seed: int = 0,
                 keep_logits: bool = False, width_bucket: int = 1, clock=time.perf_counter,
                 pack_weights: bool | None = None):
        self.model, self.nr = model, model.layout.recursions
        self.rows = max_requests
        self.cache = PagedKVCache(model, max_requests, kv, page_size, kv_pages)
        self.device = model.embed.weight.device
        if pack_weights if pack_weights is not None else self.device.type == "cpu":
            self.packed = bool(pack_linears(model))
        else:  # asked for nn.Linear's own path: undo an earlier engine's packing of this model
            unpack_linears(model)
            self.packed = False
        # A tied head is F.linear with the embedding's weight, no Linear module: packed here.
        self.tied_head = PackedWeight(model.embed.weight) if self.packed and model.head is None else None
        self.temperature, self.keep_logits, self.clock = temperature, keep_logits, clock
        self.prefill_tokens, self.width_bucket = prefill_tokens, width_bucket
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        d, dtype, dev, n = model.cfg.d_model, model.embed.weight.dtype, self.device, max_requests
        # Device state of each row's in-flight token: allocated once and only ever written in place
        # (a compiled step under CUDA graphs reads and writes it where it lies; compile_block).
        self.h = torch.zeros(n, d, dtype=dtype, device=dev)  # residual stream (token-choice: f^r(h1))
        self.h1 = torch.zeros(n, d, dtype=dtype, device=dev)  # token-choice: first unique layer's output
        self.gate = torch.zeros(n, 1, dtype=dtype, device=dev)  # token-choice: probability of its depth
        self.assigned = torch.zeros(n, dtype=torch.long, device=dev)  # token-choice: its depth
        self.logit = torch.zeros(n, dtype=dtype, device=dev)  # expert-choice: router logit of the next step
        self.depth = torch.zeros(n, dtype=torch.long, device=dev)
        self.go = torch.zeros(n, dtype=torch.bool, device=dev)  # runs the next recursion step
        self.pos = torch.zeros(n, dtype=torch.long, device=dev)
        self.all_rows = torch.arange(n, device=dev)
        # Every step applies the same shared layers (Cycle sharing): one static call for all rows.
        self.uniform = len(set(model.layout.schedule)) <= 1
        # Read off the config now: the block step (maybe compiled) touches no OmegaConf node.
        self.weighted = bool(model.routers) and model.routing.gating == "weighted"  # expert_gate's rule
        self.router_nets = _RouterNets(model.routers, self.packed) if model.routers else None
        # Host side.
        self.row_req: list[Request | None] = [None] * n
        self.free_rows = deque(range(n))
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[Request] = deque()  # admitted, prompt not all in the cache yet
        self.host_go = [False] * n
        self.host_depth = [0] * n
        self.exiting: list[int] = []  # rows whose token leaves at the next tick
        self.finished: dict[int, Request] = {}
        self.admitted_order: list[Request] = []
        self.block_fn = self._block_step  # torch.compile(...) of it, with compile_block()
        self.on_finish = None  # called with a request just before its pages are released
        self.stats = {"ticks": 0, "generated": 0, "prefill_tokens": 0, "block_rows": 0, "preemptions": 0,
                      "peak_kv_bytes": 0, "prefill_s": 0.0, "decode_s": 0.0}
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

    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or any(self.row_req))

    @torch.no_grad()
    def run(self) -> dict[int, Request]:
        """Serve every submitted request to completion; returns them by id."""
        t0 = time.perf_counter()
        while self.busy():
            self.tick()
        self.stats["seconds"] = time.perf_counter() - t0
        return self.finished

    def compile_block(self, **kwargs) -> None:
        """Run the shared-block step (static shapes: every row, masked) through torch.compile (which
        traces nn.Linear's own forward: packed weights are dropped); kwargs go to torch.compile, with
        mode="reduce-overhead" (CUDA graphs) by default on CUDA."""
        if self.device.type == "cuda":
            kwargs.setdefault("mode", "reduce-overhead")
        unpack_linears(self.model)
        self.packed, self.tied_head = False, None
        if self.router_nets is not None:
            self.router_nets.use_packed = False
        # The step writes the rows' state and the shared group's pools, positions and lengths in
        # place and reads its page tables, all at fixed addresses. Unmarked, CUDA graphs
        # (mode="reduce-overhead") would copy each such input into the graph's own buffers on every
        # replay (the whole KV pool per tick) and refuse the in-place writes (graphs skipped).
        # Nothing the step returns is kept: a graph's outputs live in its memory pool and are
        # overwritten by the next replay (reading one after that raises), so the state is not
        # handed over as outputs but written into these tensors.
        for t in (*self._row_state(), *self.cache.shared.device_tensors()):
            torch._dynamo.mark_static_address(t)
        self.block_fn = torch.compile(self._block_step, **kwargs)

    # ------------------------------------------------------------------ one tick
    @torch.no_grad()
    def tick(self) -> None:
        timer = _TickTimer(self.device, self.clock)
        plan = self._plan()
        timer.mark()
        with torch.profiler.record_function("mor::prefill"):
            prefill_depth = self._prefill(plan["chunks"]) if plan["chunks"] else None
        timer.mark()
        sampled, exit_depth, exit_logits = self._exit(plan["exit"])
        go0 = self._entry(plan, sampled)
        block = self._block(plan) if self.nr and (plan["block_continuing"] or plan["enter"]) else None
        report = [t for t in (sampled, exit_depth, go0) if t is not None]
        if block is not None:
            report += [block[0], block[1].long()]
        if prefill_depth is not None:
            report.append(prefill_depth.flatten())
        values = torch.cat(report).tolist() if report else []  # the tick's one device-to-host copy
        self._after(plan, values, exit_logits)
        prefill_s, total_s = timer.done()
        decode_s = total_s - prefill_s  # the engine's own host work counts as decode time
        self.last_tick = {"prefill_s": prefill_s, "decode_s": decode_s, "generated": len(plan["exit"]),
                          "prefill_tokens": sum(take for _, _, take in plan["chunks"])}
        self.stats["prefill_s"] += prefill_s
        self.stats["decode_s"] += decode_s
        self.stats["ticks"] += 1
        self.stats["peak_kv_bytes"] = max(self.stats["peak_kv_bytes"], self.cache.nbytes())

    # ------------------------------------------------------------------ host: plan and reserve
    def _admit(self) -> None:
        while self.waiting and self.free_rows:
            req = self.waiting.popleft()
            req.row = self.free_rows.popleft()
            if req.admitted is None:
                req.admitted = self.clock()
            self.row_req[req.row] = req
            self.prefilling.append(req)
            self.admitted_order.append(req)

    def _plan(self) -> dict:
        """This tick's work, its pages reserved; preempts the request admitted last while they do
        not fit."""
        self._admit()
        while True:  # a preempted request waits for a later tick (readmitted now it would only thrash)
            plan = self._make_plan()
            try:
                self._reserve(plan)
                return plan
            except CacheFullError:
                victims = [r for r in reversed(self.admitted_order) if r.row >= 0]
                if len(victims) <= 1:
                    raise CacheFullError("the KV pool cannot hold a single request: raise kv_pages") from None
                self._preempt(victims[0])

    def _make_plan(self) -> dict:
        chunks, budget = [], self.prefill_tokens
        for req in self.prefilling:
            todo = len(req.feed()) - 1 - req.cached
            if budget <= 0:
                break
            take = min(todo, budget)
            if take > 0:
                chunks.append((req, req.cached, take))
                budget -= take
        # Requests whose prompt will be all in the cache (but its last token) after this tick enter.
        ready = [req for req in self.prefilling
                 if len(req.feed()) - 1 - req.cached - sum(t for r, _, t in chunks if r is req) == 0]
        exit_rows = list(self.exiting)
        # An exiting token whose request then has all its tokens needs no next token.
        cont = [r for r in exit_rows if len(self.row_req[r].tokens) + 1 < self.row_req[r].max_new_tokens]
        enter = cont + [req.row for req in ready]
        block_continuing = [r for r in range(self.rows) if self.host_go[r] and r not in self.exiting]
        return {"chunks": chunks, "ready": ready, "exit": exit_rows, "cont": cont, "enter": enter,
                "block_continuing": block_continuing}

    def _reserve(self, plan: dict) -> None:
        c, nr = self.cache, self.nr
        done = []  # (group, rows, extra) reserved so far: undone when a later one does not fit
        try:
            for req, _, take in plan["chunks"]:
                for group, rows in ((c.prefix, [req.row]), (c.suffix, [req.row]), (c.shared, self._shared_all(req.row))):
                    group.reserve(rows, take)
                    done.append((group, rows, take))
            for group, rows in ((c.suffix, plan["exit"]), (c.prefix, plan["enter"])):
                group.reserve(rows, 1)
                done.append((group, rows, 1))
            if nr:
                first = [c.shared_rows(r, 0) for r in plan["enter"]]  # written if the router says go
                deeper = [] if c.kv == "share" else [c.shared_rows(r, self.host_depth[r]) for r in plan["block_continuing"]]
                for rows in (first, deeper):
                    c.shared.reserve(rows, 1)
                    done.append((c.shared, rows, 1))
        except CacheFullError:
            for group, rows, extra in done:
                for r in rows:
                    group.settle(r, group.len[r] - extra)
            raise

    def _shared_all(self, row: int) -> list[int]:
        c = self.cache
        return [c.shared_rows(row, r) for r in range(self.nr)] if c.kv == "recursion_wise" else [row] if self.nr else []

    def _width(self, group, rows) -> int:
        w = group.width(rows)
        return min(group.max_pages, math.ceil(w / self.width_bucket) * self.width_bucket)

    def _preempt(self, req: Request) -> None:
        """Free a request's row and pages; it is recomputed from its tokens so far when readmitted."""
        row = req.row
        self.cache.release([row])
        self.go[row] = False  # its token may be mid-recursion: it must not run the block again
        self.row_req[row], self.host_go[row], self.host_depth[row] = None, False, 0
        if row in self.exiting:
            self.exiting.remove(row)
        if req in self.prefilling:
            self.prefilling.remove(req)
        self.admitted_order.remove(req)
        self.free_rows.appendleft(row)
        req.row, req.cached, req.depths = -1, 0, []
        req.preemptions += 1
        self.stats["preemptions"] += 1
        self.waiting.appendleft(req)

    # ------------------------------------------------------------------ device phases
    def _prefill(self, chunks) -> torch.Tensor:
        t = max(take for _, _, take in chunks)
        tokens = torch.zeros(len(chunks), t, dtype=torch.long)
        pos = torch.zeros(len(chunks), t, dtype=torch.long)
        valid = torch.zeros(len(chunks), t, dtype=torch.bool)
        for i, (req, start, take) in enumerate(chunks):
            tokens[i, :take] = torch.tensor(req.feed()[start:start + take])
            pos[i, :take] = torch.arange(start, start + take)
            valid[i, :take] = True
        rows = [req.row for req, _, _ in chunks]
        c = self.cache
        shared_rows = [s for r in rows for s in self._shared_all(r)]
        widths = {"prefix": self._width(c.prefix, rows), "suffix": self._width(c.suffix, rows),
                  "shared": self._width(c.shared, shared_rows) if shared_rows else 1}
        dev = self.device
        self.stats["prefill_tokens"] += int(sum(take for _, _, take in chunks))
        return prefill_chunk(self.model, c, torch.tensor(rows, device=dev), tokens.to(dev), pos.to(dev),
                             valid.to(dev), widths)

    def _exit(self, rows: list[int]):
        if not rows:
            return None, None, None
        model, c = self.model, self.cache
        idx = torch.tensor(rows, device=self.device)
        h = self.h[idx]
        if model.token_router is not None:
            h = self.h1[idx] + self.gate[idx] * h
        pos = self.pos[idx][:, None]
        h = h[:, None]
        if model.suffix:
            h = run_unique(model, model.suffix, c.suffix.views(idx, pos, None, self._width(c.suffix, rows)), h, pos, None)
        h = model.norm(h)
        logits = (self.tied_head.linear(h) if self.tied_head is not None else model.output_logits(h))[:, 0]
        return pick(logits, self.temperature, self.gen), self.depth[idx], logits if self.keep_logits else None

    def _entry(self, plan: dict, sampled):
        rows = plan["enter"]
        if not rows:
            return None
        model, c, dev = self.model, self.cache, self.device
        parts, pos_parts = [], []
        if plan["cont"]:
            keep = torch.tensor([plan["exit"].index(r) for r in plan["cont"]], device=dev)
            parts.append(sampled[keep])
            pos_parts.append(self.pos[torch.tensor(plan["cont"], device=dev)] + 1)
        if plan["ready"]:
            parts.append(torch.tensor([req.feed()[-1] for req in plan["ready"]], device=dev))
            pos_parts.append(torch.tensor([len(req.feed()) - 1 for req in plan["ready"]], device=dev))
        idx = torch.tensor(rows, device=dev)
        tokens, pos = torch.cat(parts)[:, None], torch.cat(pos_parts)
        h = model.embed(tokens)
        if model.prefix:
            h = run_unique(model, model.prefix, c.prefix.views(idx, pos[:, None], None, self._width(c.prefix, rows)),
                           h, pos[:, None], None)
        h = h[:, 0]
        if self.nr == 0:
            go = torch.zeros(len(rows), dtype=torch.bool, device=dev)
        elif model.token_router is not None:
            assigned, gate = token_choice_depths(model, h)
            self.h1[idx], self.gate[idx], self.assigned[idx] = h, gate.to(h.dtype), assigned
            go = assigned > 0
        elif model.routers:
            main, causal = self.router_nets(h)
            self.logit[idx] = main[:, 0]
            go = causal[:, 0] > 0
        else:
            go = torch.ones(len(rows), dtype=torch.bool, device=dev)
        self.h[idx], self.pos[idx], self.depth[idx], self.go[idx] = h, pos, 0, go
        return go.long()

    def _block(self, plan: dict):
        c = self.cache
        srows = [c.shared_rows(r, self.host_depth[r]) for r in plan["block_continuing"]]
        srows += [c.shared_rows(r, 0) for r in plan["enter"]]
        width = self._width(c.shared, srows)
        if self.uniform:
            self.block_fn(width)
            return self.depth, self.go
        # Steps apply different shared layers (Sequence sharing): one call per step, over the rows
        # at that depth (host-known: entering rows are at 0, the others' depths came with the copy).
        by_step: dict[int, list[int]] = {0: list(plan["enter"])}
        for r in plan["block_continuing"]:
            by_step.setdefault(self.host_depth[r], []).append(r)
        out = self.h
        for step, rows in sorted(by_step.items()):
            if rows:
                idx = torch.tensor(rows, device=self.device)
                out = out.index_copy(0, idx, self._block_rows(idx, step, width))
        return self._route(out)

    def _block_step(self, width: int) -> None:
        """One recursion step for every row with go set (masked, static shapes), then the next
        routing decision, written into the rows' state."""
        self._route(self._block_rows(None, 0, width))

    def _row_state(self) -> tuple[torch.Tensor, ...]:
        return self.h, self.h1, self.gate, self.assigned, self.logit, self.depth, self.go, self.pos, self.all_rows

    def _block_rows(self, idx: torch.Tensor | None, step: int, width: int) -> torch.Tensor:
        """f(h) of rows idx (None: all rows, no gathers) at recursion `step` (whose layers every one
        of them applies)."""
        model, c, nr = self.model, self.cache, self.nr
        state = (self.go, self.depth, self.pos, self.h)
        # idx None: the engine's own tensors, not copies (the layers and _route work out of place).
        go, depth, pos, h = state if idx is None else (t[idx] for t in state)
        pos = pos[:, None]
        srows = c.shared_rows(self.all_rows if idx is None else idx, depth.clamp(max=nr - 1))
        write = go if c.kv == "recursion_wise" else go & (depth == 0)
        views = c.shared.views(srows, pos, write[:, None], width)
        return model._run_block(step, h[:, None], TokenFrame(pos, go[:, None], cache=views))[:, 0]

    def _route(self, out: torch.Tensor):
        """Apply the step's outputs (rows with go set) and decide each row's next step; the rows'
        state is written in place. Returns (depth, go) of every row after the step."""
        model, nr, go = self.model, self.nr, self.go
        depth = self.depth + go.long()
        if model.token_router is not None:
            h = torch.where(go[:, None], out, self.h)
            go_next = go & (depth < self.assigned)
        elif model.routers:
            new = out
            if self.weighted:  # x + alpha * sigmoid(logit) * f(x), as prefill.expert_gate
                new = self.h + (model.alpha * torch.sigmoid(self.logit)).unsqueeze(-1).to(out.dtype) * out
            h = torch.where(go[:, None], new, self.h)
            nxt = depth.clamp(max=nr - 1)
            main, causal = self.router_nets(h)  # (rows, Nr) each: tiny
            self.logit.copy_(torch.where(go, main.gather(1, nxt[:, None])[:, 0], self.logit))
            go_next = go & (depth < nr) & (causal.gather(1, nxt[:, None])[:, 0] > 0)
        else:
            h = torch.where(go[:, None], out, self.h)
            go_next = go & (depth < nr)
        self.h.copy_(h)
        self.depth.copy_(depth)
        self.go.copy_(go_next)
        return self.depth, self.go

    # ------------------------------------------------------------------ host: after the copy
    def _after(self, plan: dict, values: list[int], exit_logits) -> None:
        now = self.clock()
        c, at = self.cache, 0
        n_exit, n_enter = len(plan["exit"]), len(plan["enter"])
        sampled, exit_depth = values[at:at + n_exit], values[at + n_exit:at + 2 * n_exit]
        at += 2 * n_exit
        go0 = values[at:at + n_enter]
        at += n_enter
        if self.nr and (plan["block_continuing"] or plan["enter"]):
            depth, go_next = values[at:at + self.rows], values[at + self.rows:at + 2 * self.rows]
            at += 2 * self.rows
        else:
            depth, go_next = [0] * self.rows, [0] * self.rows
        # Prefill: depths of the prompt tokens; shared rows settle to the tokens that reached them.
        if plan["chunks"]:
            t = max(take for _, _, take in plan["chunks"])
            for i, (req, start, take) in enumerate(plan["chunks"]):
                d = values[at + i * t: at + i * t + take]
                req.depths.extend(d)
                req.cached += take
                for r, srow in enumerate(self._shared_all(req.row)):
                    reached = sum(1 for x in d if x > r) if c.kv == "recursion_wise" else sum(1 for x in d if x > 0)
                    c.shared.settle(srow, c.shared.len[srow] - take + reached)
        for req in plan["ready"]:
            self.prefilling.remove(req)
        # Entering tokens: their depth-0 shared row was reserved for one write.
        if self.nr:
            for r, g in zip(plan["enter"], go0):
                srow = c.shared_rows(r, 0)
                c.shared.settle(srow, c.shared.len[srow] - 1 + g)
        # Exiting tokens: record the sampled token; finish or continue the request.
        finished_rows = []
        for i, r in enumerate(plan["exit"]):
            req = self.row_req[r]
            req.depths.append(exit_depth[i])
            req.cached += 1
            req.tokens.append(sampled[i])
            req.token_times.append(now)
            if exit_logits is not None:
                req.logits.append(exit_logits[i])
            self.stats["generated"] += 1
            if len(req.tokens) >= req.max_new_tokens or (req.eos is not None and sampled[i] == req.eos):
                finished_rows.append(r)
        for r in finished_rows:
            self._finish(self.row_req[r])
        self.stats["block_rows"] += sum(1 for r in plan["block_continuing"]) + sum(go0)
        # Rows with a token in flight: where it goes next.
        self.exiting = []
        for r in range(self.rows):
            req = self.row_req[r]
            in_flight = req is not None and req not in self.prefilling and r not in finished_rows
            self.host_depth[r] = depth[r] if self.nr else 0
            self.host_go[r] = bool(go_next[r]) and in_flight
            if in_flight and not self.host_go[r]:
                self.exiting.append(r)

    def _finish(self, req: Request) -> None:
        req.done = True
        if self.on_finish is not None:
            self.on_finish(req)
        self.cache.release([req.row])
        self.row_req[req.row] = None
        self.host_go[req.row] = False
        self.free_rows.append(req.row)
        self.admitted_order.remove(req)
        self.finished[req.id] = req
        req.row = -1


class _RouterNets:
    """Every expert router's logit, and its causal decision logit, for the same rows: (n, Nr) each.
    Linear routers (the default) run as one product of their stacked weights: on the CPU a matmul
    with one output column is all fixed cost, so Nr (or 2 Nr, with aux routers) of them cost Nr times
    one. The nets are looked up on every call: calibration and loading may change or replace them."""

    def __init__(self, routers, use_packed: bool):
        self.routers, self.use_packed, self.packed = list(routers), use_packed, None

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nr = len(self.routers)
        nets = [r.net for r in self.routers] + [r.aux_net for r in self.routers if r.aux_net is not None]
        if len(nets) not in (nr, 2 * nr) or not all(isinstance(n, torch.nn.Linear) and n.out_features == 1 for n in nets):
            main = torch.stack([router(h) for router in self.routers], dim=-1)
            return main, torch.stack([r.causal_logits(h, main[:, i]) for i, r in enumerate(self.routers)], dim=-1)
        weights = [n.weight for n in nets]
        bias = None
        if any(n.bias is not None for n in nets):
            bias = torch.cat([n.bias if n.bias is not None else n.weight.new_zeros(1) for n in nets])
        if self.use_packed and (self.packed is None or len(self.packed.weights) != len(weights)
                                or any(a is not w for a, w in zip(self.packed.weights, weights))):
            self.packed = PackedWeight(*weights)
        if self.use_packed and self.packed.fits(h):
            out = self.packed.linear(h, bias)
        else:
            out = torch.nn.functional.linear(h, torch.cat(weights), bias)
        main = out[:, :nr]
        return main, out[:, nr:] if len(nets) > nr else main


class _TickTimer:
    """A tick's time and the part of it spent in prefill. CPU: the given clock (work is synchronous).
    GPU: wall time for the tick (it ends with the copy to the host, which waits for the device) and
    CUDA events around the prefill, read after that copy."""

    def __init__(self, device, clock):
        self.cuda = torch.device(device).type == "cuda"
        self.clock = time.perf_counter if self.cuda else clock
        self.start = self.clock()
        self.marks = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(self.clock())

    def done(self) -> tuple[float, float]:
        """(prefill seconds, tick seconds)."""
        total = self.clock() - self.start
        a, b = self.marks
        return (a.elapsed_time(b) / 1e3 if self.cuda else b - a), total
