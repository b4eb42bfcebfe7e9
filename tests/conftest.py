"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One intra-op thread: CI has 2 cores and many tests spawn several ranks; oversubscribed threads
# made single steps 10x slower here.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def use_shared_text() -> bool:
    """../shared's tinyshakespeare is there (MOR_TEST_NO_SHARED=1 pretends it is not, to run the
    suite as on a user's fresh clone)."""
    return SHARED_TEXT.is_file() and not os.environ.get("MOR_TEST_NO_SHARED")


def real_text_bytes(limit: int = 400_000) -> bytes:
    """Real text: tinyshakespeare where ../shared has it, else the default corpus (this Python's
    standard-library sources, there offline on every machine that runs these tests)."""
    if use_shared_text():
        return SHARED_TEXT.read_bytes()[:limit]
    from mor_dist.data_pipeline.corpus import default_corpus_files

    out = bytearray()
    for path in default_corpus_files():
        out += path.read_bytes()
        if len(out) >= limit:
            break
    return bytes(out[:limit])


@pytest.fixture(scope="session")
def text_bytes() -> bytes:
    return real_text_bytes()
