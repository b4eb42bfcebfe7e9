"""The one exception type of the data pipeline, and what its messages tell users to do."""

from __future__ import annotations

# A shard that is missing or fails its checks, wherever that is found.
BAD_SHARD_HINT = ("restore it (`mor data verify` lists every bad shard) or set data.skip_corrupt=true to train "
                  "without it")


class DataError(RuntimeError):
    """A dataset problem. The message starts with the file at fault and says what is wrong with it."""

    def __init__(self, path, problem: str | None = None):
        # One argument is a whole message: how DataLoader workers re-raise an exception in the
        # main process, which keeps the type this way.
        if problem is None:
            self.path, self.problem = "", str(path)
            super().__init__(str(path))
        else:
            self.path, self.problem = str(path), problem
            super().__init__(f"{self.path}: {problem}")
