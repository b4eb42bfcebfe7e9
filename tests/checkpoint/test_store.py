"""The checkpoint store on its own (one process): checksums, pruning, the resume choice, set-aside."""

from __future__ import annotations

import json

import pytest
import torch

from mor_dist.checkpoint import CheckpointError, CheckpointManager
from mor_dist.checkpoint.integrity import file_record
from mor_dist.checkpoint.store import write_file


def shards(value: float):
    def write(folder):
        write_file({"w": torch.full((4096,), value)}, folder / "model.pt")  # hashed while written
        (folder / "extra.bin").write_bytes(b"x" * 100)  # written around the hashing writer
    return write


def steps(mgr):
    return [p.name for p in mgr.step_folders()]


def test_every_file_has_the_sha256_of_its_bytes(tmp_path):
    mgr = CheckpointManager(tmp_path)
    folder = mgr.save(1, {"tokens_seen": 0}, shards(1.0))
    files = json.loads((folder / "meta.json").read_text())["files"]
    assert set(files) == {"model.pt", "extra.bin", "rng_rank0.pt"}
    for rel, record in files.items():
        assert record == file_record(folder / rel)
    assert not list(folder.glob("records_rank*"))


def test_pruning_keeps_latest_and_anything_newer(tmp_path):
    # A folder holding step 10 and 12 of an earlier attempt; this one saves 2 and 4 (keep_last=2):
    # the old code kept the highest numbers and deleted what `latest` named.
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for s in (10, 12):
        mgr.save(s, {}, shards(s))
    for s in (2, 4, 6):
        mgr.save(s, {}, shards(s))
        assert mgr.latest().name == mgr.step_name(s)
    assert steps(mgr) == ["step_00000012", "step_00000010", "step_00000006", "step_00000004"]
    # keep_last=1 with a newer complete folder (a kill between its rename and the `latest` update).
    one = CheckpointManager(tmp_path / "b", keep_last=1)
    for s in (3, 5):
        one.save(s, {}, shards(s))
    (one.root / "latest").write_text("step_00000003")
    one.save(4, {}, shards(4))
    assert one.latest().name == "step_00000004" and steps(one) == ["step_00000005", "step_00000004"]


def test_resume_falls_back_past_damaged_checkpoints(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for s in (1, 2, 3):
        mgr.save(s, {"tokens_seen": s}, shards(s))
    assert mgr.resolve_resume()[0].name == "step_00000003"

    # Same-size corruption: 4 KiB overwritten in the middle of the newest model file.
    f = mgr.root / "step_00000003" / "model.pt"
    data = bytearray(f.read_bytes())
    data[2000:6096] = bytes(4096)
    f.write_bytes(bytes(data))
    assert CheckpointManager(tmp_path, verify="size").resolve_resume()[0].name == "step_00000003"  # sizes agree
    folder, meta, skipped = mgr.resolve_resume()
    assert folder.name == "step_00000002" and meta["tokens_seen"] == 2
    assert len(skipped) == 1 and skipped[0].startswith(str(f)) and "sha256" in skipped[0]

    (mgr.root / "step_00000002" / "extra.bin").unlink()
    (mgr.root / "step_00000001" / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        mgr.resolve_resume()
    msg = str(e.value)
    assert "model.pt" in msg and "extra.bin: missing" in msg and "meta.json: corrupt" in msg
    assert "checkpoint.resume=false" in msg


def test_dangling_latest_and_a_later_save(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    mgr.save(1, {}, shards(1))
    mgr.save(2, {}, shards(2))
    (mgr.root / "latest").write_text("step_00000009")
    folder, _, skipped = mgr.resolve_resume()
    assert folder.name == "step_00000002" and "step_00000009, which does not exist" in skipped[0]
    # Bytes that are not text at all name no folder either (they raised UnicodeDecodeError).
    (mgr.root / "latest").write_bytes(b"\xff\xfe\x00garbage")
    folder, _, skipped = mgr.resolve_resume()
    assert folder.name == "step_00000002" and "does not exist" in skipped[0]
    # Saving a step that already exists replaces it whole (the old copy stays until the new is in place).
    mgr.save(2, {}, shards(22))
    assert torch.equal(torch.load(mgr.latest() / "model.pt")["w"], torch.full((4096,), 22.0))
    assert not list(mgr.root.glob("*.replaced"))


def test_set_aside_keeps_an_earlier_runs_checkpoints(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    assert mgr.set_aside() is None
    for s in (10, 12):
        mgr.save(s, {}, shards(s))
    aside = mgr.set_aside()
    assert aside.parent == mgr.root and aside.name.startswith("set_aside_")
    assert sorted(p.name for p in aside.iterdir()) == ["latest", "step_00000010", "step_00000012"]
    assert mgr.resolve_resume() == (None, None, [])
    mgr.save(2, {}, shards(2))
    assert steps(mgr) == ["step_00000002"] and (aside / "step_00000012" / "meta.json").is_file()


def test_a_damaged_conversion_record_reads_as_damaged(tmp_path):
    from mor_dist.checkpoint import universal

    for text in (b'{"save_id": "a", "fi', b"\xff\xfe", b"[1, 2]", b'{"save_id": "a"}'):
        (tmp_path / universal.DONE).write_bytes(text)
        with pytest.raises(CheckpointError, match="done.json"):  # the caller converts again
            universal.cached(tmp_path, "a")
