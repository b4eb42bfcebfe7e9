"""kill -9 at every fault point of saves, a replacing save and the pruning after them, synchronous and
asynchronous (files staged in host memory, written and committed by a background thread while the
caller goes on); each time the folder must resume from an intact checkpoint that `latest` names, and
the next save must work."""

from __future__ import annotations

import os
import signal
import sys

import pytest
import torch

from mor_dist.checkpoint import CheckpointManager
from mor_dist.checkpoint.store import stage_or_write

KEEP = 2


def shards(value: float):
    def write(folder):  # as DeepSpeed's files go: written, or staged for the background thread
        stage_or_write({"w": torch.full((64,), value)}, folder / "model.pt")
    return write


def run_saves(root, fault: str, trace_file=None, background: bool = False) -> int:
    """In a forked child: steps 3, 4, then step 4 again (value 44). Returns the child's wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.environ["MOR_CHECKPOINT_FAULT"] = fault
            if trace_file:
                sys.stderr = open(trace_file, "w")  # noqa: SIM115 - the child exits with os._exit
            mgr = CheckpointManager(root, keep_last=KEEP)
            for step, value in ((3, 3), (4, 4), (4, 44)):  # each background save waits for the last
                mgr.save(step, {}, shards(value), background=background)
            mgr.wait()
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


def prepared(root):
    mgr = CheckpointManager(root, keep_last=KEEP)
    mgr.save(1, {}, shards(1))
    mgr.save(2, {}, shards(2))
    return mgr


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_kill_at_every_fault_point_leaves_a_resumable_folder(tmp_path, background):
    trace = tmp_path / "trace.txt"
    prepared(tmp_path / "trace")
    assert run_saves(tmp_path / "trace", "trace", trace, background) == 0
    points = [line for line in trace.read_text().splitlines() if line.startswith("fault point")]
    assert len(points) >= 12, points  # meta, renames, `latest`, removals and pruning of three saves
    kinds = {p.split(": ", 1)[1].split(" ")[0] for p in points}
    assert {"write", "rename", "prune", "remove"} <= kinds, kinds

    seen_values = []
    for k in range(1, len(points) + 1):
        root = tmp_path / f"kill{k}"
        prepared(root)
        status = run_saves(root, str(k), background=background)
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


def test_background_saves_write_and_commit_in_the_synchronous_order(tmp_path):
    """The background thread passes the very fault points of a synchronous save, in the same order:
    every file, then the records, meta.json, the renames, `latest`, the removals and the pruning."""
    traces = {}
    for background in (False, True):
        root, trace = tmp_path / str(background), tmp_path / f"trace_{background}.txt"
        prepared(root)
        assert run_saves(root, "trace", trace, background) == 0
        traces[background] = [line.split(": ", 1)[1] for line in trace.read_text().splitlines()
                              if line.startswith("fault point")]
    assert traces[True] == traces[False]
    assert any(p.startswith("write model.pt") for p in traces[True])


def test_background_save_holds_the_state_of_its_step(tmp_path):
    """What a background save writes is the state at the step boundary: training that changes the
    tensors in place while the thread writes does not reach the files, also when the host buffers
    of the previous save are reused."""
    from mor_dist.checkpoint.safe_load import safe_load

    mgr = CheckpointManager(tmp_path, keep_last=3)
    weight = torch.zeros(1 << 16)
    for step in (1, 2, 3):
        weight.fill_(step)
        mgr.save(step, {}, lambda folder: stage_or_write({"w": weight}, folder / "model.pt"), background=True)
        weight.fill_(-1.0)  # the next "training step", while the thread writes
    mgr.wait()
    for step in (1, 2, 3):
        saved = safe_load(tmp_path / "checkpoints" / mgr.step_name(step) / "model.pt")["w"]
        assert torch.equal(saved, torch.full_like(weight, step)), step
