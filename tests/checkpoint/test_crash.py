"""kill -9 at every fault point of saves, a replacing save and the pruning after them; each time the
folder must resume from an intact checkpoint that `latest` names, and the next save must work."""

from __future__ import annotations

import os
import signal
import sys

import torch

from mor_dist.checkpoint import CheckpointManager
from mor_dist.checkpoint.store import write_file

KEEP = 2


def shards(value: float):
    def write(folder):
        write_file({"w": torch.full((64,), value)}, folder / "model.pt")
    return write


def run_saves(root, fault: str, trace_file=None) -> int:
    """In a forked child: steps 3, 4, then step 4 again (value 44). Returns the child's wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.environ["MOR_CHECKPOINT_FAULT"] = fault
            if trace_file:
                sys.stderr = open(trace_file, "w")  # noqa: SIM115 - the child exits with os._exit
            mgr = CheckpointManager(root, keep_last=KEEP)
            mgr.save(3, {}, shards(3))
            mgr.save(4, {}, shards(4))
            mgr.save(4, {}, shards(44))
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


def prepared(root):
    mgr = CheckpointManager(root, keep_last=KEEP)
    mgr.save(1, {}, shards(1))
    mgr.save(2, {}, shards(2))
    return mgr


def test_kill_at_every_fault_point_leaves_a_resumable_folder(tmp_path):
    trace = tmp_path / "trace.txt"
    prepared(tmp_path / "trace")
    assert run_saves(tmp_path / "trace", "trace", trace) == 0
    points = [line for line in trace.read_text().splitlines() if line.startswith("fault point")]
    assert len(points) >= 12, points  # meta, renames, `latest`, removals and pruning of three saves
    kinds = {p.split(": ", 1)[1].split(" ")[0] for p in points}
    assert {"write", "rename", "prune", "remove"} <= kinds, kinds

    seen_values = []
    for k in range(1, len(points) + 1):
        root = tmp_path / f"kill{k}"
        prepared(root)
        status = run_saves(root, str(k))
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, points[k - 1])
        mgr = CheckpointManager(root, keep_last=KEEP)
        folder, meta, skipped = mgr.resolve_resume()  # sha256 of every file
        assert skipped == [] and folder == mgr.latest(), (k, points[k - 1], skipped)
        value = torch.load(folder / "model.pt", weights_only=True)["w"][0].item()
        assert (meta["step"], value) in {(2, 2.0), (3, 3.0), (4, 4.0), (4, 44.0)}, (k, points[k - 1])
        seen_values.append(value)
        # The next save after the crash works and leaves no leftovers.
        mgr.save(5, {}, shards(5))
        assert mgr.resolve_resume()[0].name == "step_00000005"
        assert not [p for p in mgr.root.iterdir() if p.name.endswith((".tmp", ".replaced"))]
        assert len(mgr.step_folders()) <= KEEP + 1  # step 5 and its older keep, plus a newer leftover at most
    # Progress is never lost: the checkpoint found after a later kill is never older than after an earlier one.
    order = [2.0, 3.0, 4.0, 44.0]
    assert [order.index(v) for v in seen_values] == sorted(order.index(v) for v in seen_values)
    assert seen_values[0] == 2.0 and seen_values[-1] == 44.0
