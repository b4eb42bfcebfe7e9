"""The one exception type of the data pipeline."""

from __future__ import annotations


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
