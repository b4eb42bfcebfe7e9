"""Shared test fixtures."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

# One intra-op thread: CI has 2 cores and many tests spawn several ranks; oversubscribed threads
# made single steps 10x slower here.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def real_text_bytes(limit: int = 400_000) -> bytes:
    """Real text: ../shared's tinyshakespeare where present, else the Python standard library's own
    source (there offline on every machine that runs these tests)."""
    if SHARED_TEXT.is_file():
        return SHARED_TEXT.read_bytes()[:limit]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for path in sorted(stdlib.glob("*.py")):
        out += path.read_bytes()
        if len(out) >= limit:
            break
    return bytes(out[:limit])


@pytest.fixture(scope="session")
def text_bytes() -> bytes:
    return real_text_bytes()
