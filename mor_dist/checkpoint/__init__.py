"""The checkpoint format and its guarantees, below training, parallelism and inference (all read it).

store.py       the run folder's checkpoints/: atomic sharded saves, `latest`, pruning, resume choice
integrity.py   sha256 of every file, taken while writing, checked before reading
safe_load.py   torch.load with the restricted unpickler and an explicit allow-list (no code from files)
deepspeed_io.py DeepSpeed's engine files through the two above
faults.py      named kill points in the save path, for the crash tests
"""

from mor_dist.checkpoint.errors import CheckpointError, UnsafeCheckpointError
from mor_dist.checkpoint.store import CheckpointManager

__all__ = ["CheckpointError", "CheckpointManager", "UnsafeCheckpointError"]
