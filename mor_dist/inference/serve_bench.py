"""Serving measurement: a closed loop of synthetic requests through the engine, in steady state.

Closed loop: a new request arrives as soon as one finishes, so the engine's rows stay full. The
measured window excludes the warm-up (until as many requests as rows have finished) and the drain
(once no request waits). Decode and prefill are timed apart (the engine times the prefill part of
each tick); TTFT is from a request's admission to its first token, ITL the gap between its tokens,
both on the engine clock (CPU process time on CPU, wall time on a GPU). `serve` takes latencies and
depths from the requests admitted and finished inside the window: the warm-up takes about two
requests per row, so a window needs about two more per row before any of its own requests finish
(MIN_REQUESTS_PER_ROW); `mor serve-bench` defaults to DEFAULT_REQUESTS_PER_ROW.
"""

from __future__ import annotations

import statistics
import time

import torch

from .engine import ServingEngine

DEFAULT_REQUESTS_PER_ROW = 8  # `mor serve-bench`'s --requests: 8 x --max-requests
MIN_REQUESTS_PER_ROW = 4  # fewer leave a window whose own requests (mostly) do not finish in it


def synthetic_prompts(n: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n random prompts, lengths uniform in [prompt_len // 2, prompt_len]."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(1, prompt_len // 2), prompt_len + 1, (n,), generator=g).tolist()
    return [torch.randint(2, vocab, (m,), generator=g).tolist() for m in lens]


def default_clock(device) -> callable:
    return time.perf_counter if torch.device(device).type == "cuda" else time.process_time


class BusyClock:
    """Time that advances only while this engine ticks: engines measured in turns in one process
    must not count each other's ticks in their latencies."""

    def __init__(self, clock):
        self.clock, self.total, self.since = clock, 0.0, None

    def __call__(self) -> float:
        return self.total + (self.clock() - self.since if self.since is not None else 0.0)

    def start(self) -> None:
        self.since = self.clock()

    def stop(self) -> None:
        self.total, self.since = self(), None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


class ClosedLoop:
    """One engine kept full of synthetic requests: prompts of prompt_len/2..prompt_len tokens,
    gen_len/2..gen_len new tokens each (seeded), no EOS."""

    def __init__(self, model, rows: int, prompt_len: int, gen_len: int, seed: int = 0, total: int | None = None,
                 **engine_kwargs):
        self.clock = BusyClock(engine_kwargs.pop("clock", None) or default_clock(model.embed.weight.device))
        self.engine = ServingEngine(model, rows, clock=self.clock, **engine_kwargs)
        self.model, self.rows = model, rows
        self.prompt_len, self.gen_len = prompt_len, gen_len
        self.g = torch.Generator().manual_seed(seed)
        self.vocab, self.total, self.submitted = model.cfg.vocab_size, total, 0
        self.window = {"ticks": 0, "decode_s": 0.0, "prefill_s": 0.0, "generated": 0, "prefill_tokens": 0}
        self.measured: set[int] = set()  # requests in a row at the end of a measured tick
        self.before: set[int] | None = None  # open_window(): requests admitted before it (not counted)
        for _ in range(rows + 1):  # every row busy, and one waiting
            self._submit()

    def _submit(self) -> None:
        if self.total is not None and self.submitted >= self.total:
            return
        self.submitted += 1
        n = int(torch.randint(max(1, self.prompt_len // 2), self.prompt_len + 1, (), generator=self.g))
        gen = int(torch.randint(max(1, self.gen_len // 2), self.gen_len + 1, (), generator=self.g))
        self.engine.submit(torch.randint(2, self.vocab, (n,), generator=self.g).tolist(), gen)

    def steady(self) -> bool:
        """Every row busy with a request queued behind them."""
        return bool(self.engine.waiting)

    def warm_up(self) -> None:
        """Until as many requests as rows have finished (rows admitted at different times since)."""
        while len(self.engine.finished) < self.rows:
            self.step(measure=False)

    def open_window(self) -> None:
        """From here on summary() counts the requests admitted after this call (instead of those seen
        in a row at the end of a measured tick): none admitted under warm-up conditions."""
        e = self.engine
        self.before = {r.id for r in (*e.finished.values(), *e.row_req, *e.waiting)
                       if r is not None and r.admitted is not None}

    def counted(self) -> list:
        """The finished requests summary() takes latencies and depths from."""
        e = self.engine
        if self.before is not None:
            return [r for i, r in e.finished.items() if i not in self.before]
        return [r for i, r in e.finished.items() if i in self.measured]

    def step(self, measure: bool = True) -> dict:
        e = self.engine
        done_before = len(e.finished)
        self.clock.start()
        e.tick()
        self.clock.stop()
        for _ in range(len(e.finished) - done_before):  # closed loop: one arrives per one finished
            self._submit()
        t = e.last_tick
        if measure:
            for k in ("decode_s", "prefill_s", "generated", "prefill_tokens"):
                self.window[k] += t[k]
            self.window["ticks"] += 1
            self.measured.update(r.id for r in e.row_req if r is not None)
        return t

    def run_round(self, ticks: int) -> dict:
        """`ticks` measured ticks; the round's decode and prefill throughput."""
        got = {"decode_s": 0.0, "prefill_s": 0.0, "generated": 0, "prefill_tokens": 0}
        for _ in range(ticks):
            t = self.step()
            for k in got:
                got[k] += t[k]
        return {"decode_tokens_per_s": got["generated"] / got["decode_s"] if got["decode_s"] else None,
                "prefill_tokens_per_s": got["prefill_tokens"] / got["prefill_s"] if got["prefill_s"] else None,
                **got}

    def summary(self) -> dict:
        """Latencies and depths of the finished requests counted() gives, cache figures."""
        e, nr = self.engine, self.model.layout.recursions
        done = self.counted()
        ttft = [r.token_times[0] - r.admitted for r in done if r.token_times and r.admitted is not None]
        itl = [b - a for r in done for a, b in zip(r.token_times, r.token_times[1:])]
        new_depths = [d for r in done for d in r.depths[len(r.prompt) - 1:]]
        w = self.window
        return {
            "rows": self.rows,
            "requests_finished": len(e.finished),
            "requests_measured": len(done),
            "measured_ticks": w["ticks"],
            "decode_tokens_per_s": w["generated"] / w["decode_s"] if w["decode_s"] else None,
            "prefill_tokens_per_s": w["prefill_tokens"] / w["prefill_s"] if w["prefill_s"] else None,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
            "depth_hist": [new_depths.count(i) / max(len(new_depths), 1) for i in range(nr + 1)],
            "kv_bytes_per_token": kv_bytes_per_token(self.model, e.cache, new_depths),
            "peak_kv_bytes": e.stats["peak_kv_bytes"],
            "block_fill": e.stats["block_rows"] / max(e.stats["ticks"], 1) / self.rows if nr else None,
            "preemptions": e.stats["preemptions"],
        }


def kv_bytes_per_token(model, cache, depths: list[int]) -> float:
    """K/V bytes one token leaves in the caches, from the depths tokens took: every unique layer,
    plus per shared layer one entry per depth reached (recursion-wise) or one if it reached
    recursion 1 (sharing)."""
    lay = model.layout
    if not depths:
        return 0.0
    if cache.kv == "recursion_wise":
        shared = lay.block * sum(depths) / len(depths)
    else:
        shared = lay.block * sum(d >= 1 for d in depths) / len(depths)
    return (lay.prefix + lay.suffix + shared) * cache.entry_bytes()


@torch.no_grad()
def serve(model, rows: int, requests: int, prompt_len: int, gen_len: int, seed: int = 0, compiled: bool = False,
          **engine_kwargs) -> dict:
    """`mor serve-bench`: `requests` requests (at least rows + 1) through `rows` rows in a closed
    loop; figures from the steady state: the ticks after the warm-up while requests wait, latencies
    and depths of the requests admitted and finished in them. Where none finished (too few requests
    for the rows: fewer than MIN_REQUESTS_PER_ROW per row), the drain is measured too and
    steady_state is False. compiled: the shared-block step through torch.compile, with CUDA graphs
    on a GPU (compiled in the warm-up)."""
    if compiled:
        engine_kwargs.setdefault("width_bucket", 4)  # pages read per call rounded up: fewer shapes to compile
    loop = ClosedLoop(model, rows, prompt_len, gen_len, seed, total=max(requests, rows + 1), **engine_kwargs)
    if compiled:
        loop.engine.compile_block()
    loop.warm_up()
    loop.open_window()
    while loop.steady():
        loop.step()
    steady = bool(loop.counted())
    if not steady:  # too few requests for a steady state: measure the drain, every request seen in it
        loop.before = None
        while loop.engine.busy():
            loop.step()
    return {**loop.summary(), "steady_state": steady}


def median_spread(values: list[float]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
