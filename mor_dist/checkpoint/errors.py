"""Exceptions of the checkpoint layer. Messages start with the file or folder at fault."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message names the file and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds something other than tensors and plain data: it is never unpickled."""
