"""Sharded, atomic, checksummed checkpoints in a run folder.

    run_dir/checkpoints/latest              -> "step_00000100" (moved only after a complete save)
    run_dir/checkpoints/step_00000100/      one folder per step:
        meta.json                           step, tokens seen, loader state, config, every file's
                                            size and sha256, a save id
        rng_rank{r}.pt                      RNG of every rank
        ...                                 model / optimizer shards written by the train module
    run_dir/checkpoints/set_aside_<time>/   checkpoints of an earlier run in this folder, kept when a
                                            new run started here (checkpoint.resume=false)

A save goes to `step_N.tmp/`; every rank writes its files (hashed on the way, fsynced) and a record
of them; when every rank succeeded, rank 0 writes meta.json, renames the folder and only then moves
`latest`. A kill at any point leaves `latest` naming a complete checkpoint. Pruning never removes
the checkpoint `latest` names nor a newer one. A failed write (disk full) on any rank removes the
partial folder on every rank's word and leaves `latest` as it was.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import random
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from mor_dist.checkpoint.errors import CheckpointError
from mor_dist.checkpoint.faults import fault_point
from mor_dist.checkpoint.integrity import HashingWriter, file_record, verify_files
from mor_dist.checkpoint.safe_load import safe_load

META = "meta.json"
LATEST = "latest"
ASIDE_PREFIX = "set_aside_"
_RECORDS = "records_rank{}.json"

# Files this process wrote through write_file, absolute path -> {"size", "sha256"}: the save
# collects those under its folder instead of reading them back.
_written: dict[str, dict] = {}


def write_file(obj, path: Path, **save_kwargs) -> None:
    """torch.save hashed on its way to disk and fsynced."""
    fault_point(f"write {Path(path).name}")
    writer = HashingWriter(path)
    try:
        torch.save(obj, writer, **save_kwargs)
        writer.close()
    except Exception as e:
        error = writer.error or (e if isinstance(e, OSError) else None)
        try:
            writer.close()
        except OSError as close_error:
            error = error or close_error
        if error is None:
            raise
        if error.filename is None:
            error.filename = str(path)
        raise error from None
    _written[str(Path(path).resolve())] = writer.record()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _all_ok(ok: bool, group=None) -> bool:
    """True on every rank when it is true on every rank (also a barrier)."""
    if _world() == 1:
        return ok
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _first_error(fn) -> OSError | None:
    try:
        fn()
    except OSError as e:
        return e
    return None


# ---------------------------------------------------------------------- asynchronous saves
_staging: list | None = None  # while a background save stages its files: [(host copy, path, kwargs)]


def stage_or_write(obj, path, **save_kwargs) -> None:
    """write_file, or -- inside staged() -- keep a host-memory copy of obj for a later write_file."""
    if _staging is None:
        write_file(obj, path, **save_kwargs)
    else:
        _staging.append((host_copy(obj), Path(path), save_kwargs))


@contextlib.contextmanager
def staged():
    global _staging
    _staging = files = []
    try:
        yield files
    finally:
        _staging = None
        _pool.clear()  # buffers this save did not take back (shapes that changed): let them go


# Host buffers of the last background save, reused by the next one: copying into memory already
# touched costs no page faults (a fresh multi-GB allocation faults in every page on first write), and
# on a GPU they are pinned, so the device-to-host copies run at full speed. They are as large as the
# rank's checkpoint shard, the host memory an asynchronous save needs anyway.
_pool: dict[tuple, list[torch.Tensor]] = {}


def host_copy(obj):
    """A copy that later training steps cannot change: tensors copied to host memory (a view copies
    only its own elements), containers rebuilt, anything else deep-copied."""
    if obj is None or type(obj) in (int, float, bool, str):  # immutable: shared, not copied
        return obj
    if torch.is_tensor(obj):
        t = obj.detach()
        free = _pool.get((t.shape, t.dtype))
        buf = free.pop() if free else torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
        return buf.copy_(t)
    if isinstance(obj, dict):
        return type(obj)((k, host_copy(v)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(host_copy(v) for v in obj)
    return copy.deepcopy(obj)


class _Pending:
    """A save being finished by a background thread (daemon: a process that dies or raises on the
    way out does not wait for it; the save then never reaches `latest`, as after a kill)."""

    def __init__(self, final: Path):
        self.final, self.error = final, None
        self.thread = None

    def start(self, fn, *args) -> None:
        def run():
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the thread that waits
                self.error = e
        self.thread = threading.Thread(target=run, name=f"save {self.final.name}", daemon=True)
        self.thread.start()

    def join(self) -> Path:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.final


def _release(obj) -> None:
    """A written file's host copy: its tensors back to the pool for the next save."""
    if torch.is_tensor(obj):
        _pool.setdefault((obj.shape, obj.dtype), []).append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _release(v)
    elif type(obj) in (list, tuple):
        for v in obj:
            _release(v)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    fault_point(f"rename {path.name}")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_error(e: OSError, latest: str | None) -> str:
    where = e.filename or "the checkpoint folder"
    kept = f"`latest` still names {latest}" if latest else "no earlier checkpoint exists"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}: no space left on device while writing a checkpoint; {kept}. Free space, then rerun"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}: not writable ({e.strerror}); {kept}. Fix the permissions of the run folder, then rerun"
    return f"{where}: writing a checkpoint failed: {e.strerror or e}; {kept}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_of(path: Path) -> int:
    return int(path.name.split("_")[1].split(".")[0])


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int = 3, verify: str = "sha256"):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.verify_mode = verify
        self._pending: _Pending | None = None  # a background save in flight
        self._group = None  # the background saves' process group (world > 1)

    @staticmethod
    def step_name(step: int) -> str:
        return f"step_{step:08d}"

    # ------------------------------------------------------------------ reading the folder
    def latest_name(self) -> str | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        # Damaged bytes name no folder (latest() says so, and a resume falls back) rather than raise here.
        return pointer.read_bytes().decode("utf-8", errors="replace").strip()

    def folder(self, name: str) -> Path | None:
        """Where the checkpoint `name` is: its folder, or -- after a kill while a save of the same
        step replaced it -- the complete copy set aside as `<name>.replaced`."""
        for path in (self.root / name, self.root / f"{name}.replaced"):
            if path.is_dir() and (path / META).is_file():
                return path
        return None

    def latest(self) -> Path | None:
        """The folder `latest` names (None without one); raises when it is gone."""
        name = self.latest_name()
        if name is None:
            return None
        path = self.folder(name)
        if path is None:
            raise CheckpointError(f"{self.root / LATEST}: names {name!r}, but {self.root / name} does not exist")
        return path

    def step_folders(self) -> list[Path]:
        """Finished step folders (renamed from .tmp), newest first."""
        found = [p for p in self.root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
        return sorted(found, key=step_of, reverse=True)

    def has_checkpoints(self) -> bool:
        return (self.root / LATEST).exists() or bool(list(self.root.glob("step_*")))

    def read_meta(self, path: Path) -> dict:
        meta_path = path / META
        if not meta_path.is_file():
            raise CheckpointError(f"{meta_path}: missing: the checkpoint {path} is incomplete")
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or "step" not in meta:
                raise ValueError("not a checkpoint record (no step / files)")
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{meta_path}: corrupt: {e}") from None
        return meta

    def verify(self, path: Path, mode: str | None = None, part: tuple[int, int] = (0, 1)) -> dict:
        """meta.json of a checkpoint folder after checking its files (this part of them)."""
        meta = self.read_meta(path)
        verify_files(path, meta["files"], mode or self.verify_mode, path / META, part)
        return meta

    def resolve_resume(self) -> tuple[Path | None, dict | None, list[str]]:
        """Collective. The checkpoint to resume: `latest` when intact, else the newest intact one
        older than it. Returns (folder, meta, [why each newer candidate was skipped]); (None, None,
        []) when the folder has no checkpoint. Ranks verify disjoint slices of the files."""
        skipped: list[str] = []
        name = self.latest_name()
        folders = self.step_folders()
        if name is None and not folders:
            return None, None, []
        named = self.folder(name) if name is not None else None
        if name is not None and named is None:
            skipped.append(f"{self.root / LATEST}: names {name}, which does not exist")
        if named is not None:
            top = step_of(named)
            candidates = [named] + [p for p in folders if step_of(p) < top]
        else:
            candidates = folders
        for path in candidates:
            problem = None
            try:
                meta = self.verify(path, part=(_rank(), _world()))
            except CheckpointError as e:
                problem = str(e)
            problems = [problem]
            if _world() > 1:
                problems = [None] * _world()
                dist.all_gather_object(problems, problem)
            problem = next((p for p in problems if p), None)
            if problem is None:
                return path, meta, skipped
            skipped.append(problem)
        raise CheckpointError(
            f"{self.root}: no intact checkpoint to resume:\n  " + "\n  ".join(skipped)
            + "\nRestore the files from a copy, or start a new run here with checkpoint.resume=false "
            "(the damaged checkpoints are kept, set aside)"
        )

    def restore_rng(self, path: Path) -> None:
        """This rank's RNG, when the checkpoint has one for it (a resized run re-seeds the rest)."""
        f = path / f"rng_rank{_rank()}.pt"
        if f.is_file():
            set_rng_state(safe_load(f))

    # ------------------------------------------------------------------ writing
    def save(self, step: int, meta: dict, write_shards: Callable[[Path], None], background: bool = False,
             on_done: Callable[[Path], None] | None = None) -> Path:
        """Collective: every rank calls it. write_shards(tmp_dir) writes this rank's model/optimizer
        files. Returns the final folder. A save first waits for the one in flight, if any.

        background: write_shards only stages its files in host memory (store.staged); a thread
        writes them and finishes the save -- same files, checksums, fsyncs and commit order -- while
        the caller trains on. wait() returns when it is done (and raises its error); on_done(folder)
        runs in that thread on success."""
        self.wait()
        final = self.root / self.step_name(step)
        tmp = final.with_name(final.name + ".tmp")
        latest = self.latest_name()
        error = None
        if _rank() == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            except OSError as e:
                error = e
        if not background:
            agreed = _all_ok(error is None)
            if agreed:
                error = _first_error(lambda: (write_shards(tmp), write_file(rng_state(), tmp / f"rng_rank{_rank()}.pt")))
            self._finish(step, meta, tmp, final, latest, error, wrote=agreed)
            if on_done is not None:
                on_done(final)
            return final
        files: list = []
        if _all_ok(error is None):
            with staged() as files:
                error = _first_error(lambda: (write_shards(tmp), stage_or_write(rng_state(), tmp / f"rng_rank{_rank()}.pt")))
        if not _all_ok(error is None):  # staging touches the disk only for folders
            self._finish(step, meta, tmp, final, latest, error, wrote=False)
        group = self._background_group()
        self._pending = _Pending(final)
        self._pending.start(self._write_staged, files, step, meta, tmp, final, latest, group, on_done)
        return final

    def wait(self) -> Path | None:
        """Block until the background save in flight (if any) is done: its folder, or its error."""
        pending, self._pending = self._pending, None
        return pending.join() if pending is not None else None

    def _write_staged(self, files: list, step, meta, tmp, final, latest, group, on_done) -> None:
        def write_all():
            while files:  # each file's host copy goes back to the pool once written
                obj, path, kwargs = files.pop(0)
                write_file(obj, path, **kwargs)
                _release(obj)
        self._finish(step, meta, tmp, final, latest, _first_error(write_all), group)
        if on_done is not None:
            on_done(final)

    def _background_group(self):
        """A process group of its own for the background thread's agreements: collectives of two
        threads on one group could pair up differently on different ranks. Made once, by every rank
        together, from the main thread."""
        if _world() == 1:
            return None
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _finish(self, step: int, meta: dict, tmp: Path, final: Path, latest: str | None, error: OSError | None,
                group=None, wrote: bool = True) -> None:
        """Every rank's files are written (or `error` says why not; wrote=False: nothing was, another
        rank failed first): records, agreement, rank 0's commit, agreement. A failure anywhere removes
        the partial folder and raises."""
        if error is None and wrote:
            error = _first_error(lambda: self._write_records(tmp))
        if not _all_ok(error is None, group):
            self._discard(tmp)
            raise CheckpointError(_write_error(error, latest) if error else
                                  f"{tmp}: another rank failed to write its part of the checkpoint (see its "
                                  f"message); `latest` still names {latest}")
        if _rank() == 0:
            error = _first_error(lambda: self._commit(step, meta, tmp, final))
        if not _all_ok(error is None, group):
            self._discard(tmp)
            raise CheckpointError(_write_error(error, self.latest_name()) if error else
                                  f"{tmp}: rank 0 failed to finish the checkpoint (see its message)")

    def _write_records(self, tmp: Path) -> None:
        """This rank's files of the save, with the checksums taken while writing them."""
        mine = {}
        prefix = str(tmp.resolve()) + os.sep
        for path in [p for p in _written if p.startswith(prefix)]:
            mine[path[len(prefix):]] = _written.pop(path)
        _write_atomic(tmp / _RECORDS.format(_rank()), json.dumps(mine))

    def _commit(self, step: int, meta: dict, tmp: Path, final: Path) -> None:
        files = {}
        for r in range(_world()):
            rec = tmp / _RECORDS.format(r)
            files.update(json.loads(rec.read_text()))
            rec.unlink()
        for p in sorted(tmp.rglob("*")):  # written around our hashing writer: read back once
            rel = str(p.relative_to(tmp))
            if p.is_file() and rel not in files:
                files[rel] = file_record(p)
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        meta = dict(meta, step=step, files=files, world_size=_world(), save_id=uuid.uuid4().hex)
        fault_point(f"write meta {final.name}")
        _write_atomic(tmp / META, json.dumps(meta, indent=1, default=str))
        _fsync_dir(tmp)
        replaced = final.with_name(final.name + ".replaced")
        if final.exists():  # this step saved by an earlier attempt: kept until the new one is in place
            if replaced.exists():
                shutil.rmtree(replaced)
            fault_point(f"rename {final.name} -> .replaced")
            os.replace(final, replaced)
        fault_point(f"rename {tmp.name}")
        os.replace(tmp, final)
        _fsync_dir(self.root)
        _write_atomic(self.root / LATEST, final.name)
        if replaced.exists():
            fault_point(f"remove {replaced.name}")
            shutil.rmtree(replaced)
        self._prune()

    def _discard(self, tmp: Path) -> None:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        for path in [p for p in _written if p.startswith(str(tmp.resolve()))]:
            del _written[path]

    def _prune(self) -> None:
        """Keep `latest`, anything newer, and the newest keep_last - 1 older ones; clear leftovers
        of killed saves."""
        name = self.latest_name()
        if name is None:
            return
        top = step_of(self.root / name)
        older = [p for p in self.step_folders() if step_of(p) < top]
        for old in older[self.keep_last - 1:]:
            fault_point(f"prune {old.name}")
            shutil.rmtree(old)
        for stale in list(self.root.glob("step_*.tmp")) + list(self.root.glob("step_*.replaced")):
            fault_point(f"prune {stale.name}")
            shutil.rmtree(stale)

    def set_aside(self) -> Path | None:
        """Move every checkpoint of the folder (an earlier run's) into set_aside_<time>/; None
        when there was nothing to move."""
        if not self.has_checkpoints():
            return None
        dest = self.root / (ASIDE_PREFIX + time.strftime("%Y%m%d-%H%M%S"))
        while dest.exists():  # two restarts within a second
            dest = dest.with_name(dest.name + "_")
        dest.mkdir()
        for p in sorted(self.root.glob("step_*")) + [self.root / LATEST]:
            if p.exists():
                os.replace(p, dest / p.name)
        _fsync_dir(self.root)
        return dest
