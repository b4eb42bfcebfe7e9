"""Run a function in N local processes over gloo, as torchrun would start them (tests, benchmarks).

Each rank gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (a port free right now),
one intra-op thread, and returns fn's result (picklable) to the caller; a failure in any rank raises
here with that rank's traceback. Ranks pay ~15 s of imports each: group many cases per world.
"""

from __future__ import annotations

import io
import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, queue):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    import faulthandler

    import torch

    torch.set_num_threads(1)
    if os.environ.get("MOR_TEST_STACKS_AFTER"):  # debugging a hang: every rank prints its stacks
        faulthandler.dump_traceback_later(float(os.environ["MOR_TEST_STACKS_AFTER"]), exit=True)
    try:
        # Plain bytes: torch's queue pickler shares tensors through fds that die with the rank.
        buf = io.BytesIO()
        torch.save(fn(*args), buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
        raise


def run_world(fn, world: int, *args, timeout: float = 600.0) -> list:
    """fn(*args) in `world` ranks; returns the per-rank results, rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                import torch

                results[rank] = torch.load(io.BytesIO(value), weights_only=True)
            else:
                errors.append(f"rank {rank}:\n{value}")
                break  # the other ranks are likely stuck in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world)]
