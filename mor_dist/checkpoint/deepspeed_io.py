"""DeepSpeed's checkpoint files through our reader and writer.

DeepSpeed reads and writes every engine file through `engine.checkpoint_engine`. Ours writes with
checksums taken on the way (store.write_file) and reads with the restricted unpickler (safe_load);
`install(engine)` puts it in place of DeepSpeed's TorchCheckpointEngine after initialize.
"""

from __future__ import annotations

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from mor_dist.checkpoint.safe_load import safe_load
from mor_dist.checkpoint.store import write_file


class SafeCheckpointEngine(TorchCheckpointEngine):
    def save(self, state_dict, path: str):
        write_file(state_dict, path, _use_new_zipfile_serialization=self.zipfile_serialization)

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location=map_location)


def install(engine) -> None:
    """Replace the engine's checkpoint engine (DeepSpeedEngine and PipelineEngine alike)."""
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
