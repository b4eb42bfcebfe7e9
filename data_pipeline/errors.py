"""The one exception type of the data pipeline."""

from __future__ import annotations


class DataError(RuntimeError):
    """A dataset problem. The message starts with the file at fault and says what is wrong with it."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
