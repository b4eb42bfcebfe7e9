"""The harness runs offline here (task data written by the tests); the run folder is tests/hf's."""

from tests.hf.conftest import trained_run, tiny_dataset  # noqa: F401  (also sets HF_*_OFFLINE)
