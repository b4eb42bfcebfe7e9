"""Files an export or a run folder writes for others to read."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replacing(path: Path):
    """A temporary file beside `path` to write, given the umask's mode (safetensors writes 0600) and
    renamed over `path`: a symbolic link planted at `path` is replaced, never written through, and a
    reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
