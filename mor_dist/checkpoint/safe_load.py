"""Reading checkpoint files without running code from them.

torch.load(weights_only=False) unpickles arbitrary objects: a crafted file runs code. Every checkpoint
read of the project goes through `safe_load`, torch's restricted unpickler (weights_only=True) plus an
explicit allow-list of the few non-tensor types DeepSpeed's files hold. DeepSpeed's own loading code
(engine loads, zero_to_fp32, universal conversion) calls torch.load(weights_only=False) directly;
`guarded_loads()` routes those calls through `safe_load` too, for as long as the block runs.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import pickle
import sys
import threading
from pathlib import Path

import torch

from mor_dist.checkpoint.errors import CheckpointError, UnsafeCheckpointError

_torch_load = torch.load  # the real one, before any guard replaces the module attribute
_guard_lock = threading.Lock()
_guard_depth = 0
_transforms: list = []  # applied, in order, to what a guarded load returns


# ZeRO optimizer files: the stage (an Enum), the loss scaler (two numbers), flat-buffer fragments.
DEEPSPEED_TYPES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def allowed_globals(with_deepspeed: bool) -> list:
    """Every non-tensor, non-builtin type a checkpoint of this project may hold, and no other.
    Found by torch.serialization.get_unsafe_globals_in_checkpoint over saves of every ZeRO stage,
    TP, PP, bf16 and universal conversion (tests/checkpoint/test_safe_load.py keeps it honest)."""
    import numpy as np

    # rng_rank*.pt: numpy's RNG state is (name, uint32 array, pos, has_gauss, cached_gaussian)
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _numpy_reconstruct()]
    if with_deepspeed:
        for dotted in DEEPSPEED_TYPES:
            module, _, name = dotted.rpartition(".")
            allowed.append(getattr(importlib.import_module(module), name))
    return allowed


def _numpy_reconstruct():
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return core.multiarray._reconstruct


def safe_load(path, map_location="cpu", mmap: bool | None = None):
    """torch.load of a checkpoint file with the restricted unpickler; a file that wants anything
    else raises UnsafeCheckpointError naming the file (nothing of it has run)."""
    kwargs = {"map_location": map_location, "weights_only": True}
    if mmap is not None:
        kwargs["mmap"] = mmap
    # DeepSpeed is imported only for its own files (it prints on import, and costs a second).
    with_ds = "deepspeed" in sys.modules
    try:
        with torch.serialization.safe_globals(allowed_globals(with_ds)):
            return _torch_load(path, **kwargs)
    except pickle.UnpicklingError as e:
        if not with_ds and any(t in str(e) for t in DEEPSPEED_TYPES) and importlib.util.find_spec("deepspeed"):
            with torch.serialization.safe_globals(allowed_globals(True)):
                return _load_or_refuse(path, kwargs)
        raise _refusal(path, e) from None
    except (RuntimeError, EOFError, ValueError) as e:  # a damaged zip / truncated stream
        raise CheckpointError(f"{_name(path)}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                              f"restore it from a copy or resume from another checkpoint{_how(path)}") from None


def _how(path) -> str:
    """How to resume from an earlier checkpoint, for a file inside RUN/checkpoints/step_N/."""
    if not isinstance(path, (str, Path)):
        return ""
    step = Path(path).parent
    if not (step.name.startswith("step_") and step.parent.name == "checkpoints"):
        return ""
    return f" (write an earlier step folder's name, e.g. step_00000001, into {step.parent / 'latest'})"


def _name(path) -> str:
    return str(path) if isinstance(path, (str, Path)) else getattr(path, "name", "a checkpoint stream")


def _load_or_refuse(path, kwargs):
    try:
        return _torch_load(path, **kwargs)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None


def _refusal(path, e: Exception) -> UnsafeCheckpointError:
    detail = str(e).split("Check the documentation")[0].strip().splitlines()
    what = next((line.strip() for line in detail if "GLOBAL" in line or "Unsupported" in line), detail[-1])
    return UnsafeCheckpointError(
        f"{_name(path)}: refused to load: it holds something other than tensors and plain data ({what}), so it "
        f"is damaged or was crafted to run code. Restore it from a trusted copy or resume from another checkpoint{_how(path)}"
    )


def _guarded_load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
    # DeepSpeed's calls pass weights_only=False: ignored on purpose, that is the point of the guard.
    obj = safe_load(f, map_location=map_location, mmap=mmap)
    for transform in list(_transforms):
        obj = transform(obj)
    return obj


@contextlib.contextmanager
def guarded_loads(transform=None):
    """Within the block, torch.load anywhere in this process (DeepSpeed included) is safe_load;
    `transform(obj) -> obj`, when given, also sees everything loaded (universal conversion fixes)."""
    global _guard_depth
    with _guard_lock:
        if _guard_depth == 0:
            torch.load = _guarded_load
        _guard_depth += 1
        if transform is not None:
            _transforms.append(transform)
    try:
        yield
    finally:
        with _guard_lock:
            if transform is not None:
                _transforms.remove(transform)
            _guard_depth -= 1
            if _guard_depth == 0:
                torch.load = _torch_load
