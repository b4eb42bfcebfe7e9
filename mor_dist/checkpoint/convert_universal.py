"""DeepSpeed's universal-checkpoint converter (`deepspeed.checkpoint.ds_to_universal`), run in this
process with three things set right on the way in:

- every torch.load it makes goes through safe_load (its own code unpickles with weights_only=False);
- megatron's parallel linears store `_extra_state = None` in the module state, which the converter
  would cast to fp32 (it copies every module entry without optimizer state): those entries are dropped
  as the files are read;
- a weight tied across pipeline stages (the embedding, the shared block) is taken from the first stage
  that holds it (`mor_first_stage` in the checkpoint's universal_checkpoint_info). DeepSpeed's own
  rule keeps stage 0's copy only, and the shared block need not live on stage 0; copies from several
  stages would overwrite each other's data-parallel fragments.

`python -m mor_dist.checkpoint.convert_universal --input_folder IN --output_folder OUT` runs it as a
command (same arguments as DeepSpeed's).
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

from mor_dist.checkpoint.errors import CheckpointError
from mor_dist.checkpoint.safe_load import guarded_loads

FIRST_STAGE = "mor_first_stage"  # universal_checkpoint_info key: tied weight name -> first stage holding it


def _drop_empty_extra_state(obj):
    if isinstance(obj, dict) and isinstance(obj.get("module"), dict):
        module = obj["module"]
        for key in [k for k, v in module.items() if v is None and k.endswith("._extra_state")]:
            del module[key]
    return obj


@contextlib.contextmanager
def _first_stage_only():
    from deepspeed.checkpoint import DeepSpeedCheckpoint
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_SLICE_MAPPINGS, UNIVERSAL_CHECKPOINT_INFO

    original = DeepSpeedCheckpoint.get_zero_checkpoint_state

    def state(self, pp_index, tp_index, dp_index, *args, **kwargs):
        sd = original(self, pp_index, tp_index, dp_index, *args, **kwargs)
        first = (self.get_checkpoint_info(UNIVERSAL_CHECKPOINT_INFO) or {}).get(FIRST_STAGE, {})
        for mapping in sd[OPTIMIZER_STATE_DICT][PARAM_SLICE_MAPPINGS]:
            for name in [n for n in mapping if first.get(n, pp_index) != pp_index]:
                del mapping[name]
        return sd

    DeepSpeedCheckpoint.get_zero_checkpoint_state = state
    try:
        yield
    finally:
        DeepSpeedCheckpoint.get_zero_checkpoint_state = original


def ds_to_universal(folder: Path, out: Path) -> None:
    """DeepSpeed checkpoint folder -> DeepSpeed universal checkpoint in `out` (one process, no
    workers). Raises CheckpointError naming the folder, with the converter's last words."""
    from deepspeed.checkpoint import ds_to_universal as converter

    args = argparse.Namespace(input_folder=str(folder), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    said = io.StringIO()
    try:
        with guarded_loads(_drop_empty_extra_state), _first_stage_only(), \
                contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            converter.main(args)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever DeepSpeed raises, said with the folder
        raise CheckpointError(f"{folder}: DeepSpeed's universal-checkpoint converter failed: {type(e).__name__}: "
                              f"{e}\n{said.getvalue()[-2000:]}") from e


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input_folder", required=True)
    parser.add_argument("--output_folder", required=True)
    parser.add_argument("--num_extract_workers", type=int, default=1)  # accepted for DeepSpeed's CLI; one process here
    parser.add_argument("--num_merge_workers", type=int, default=1)
    a = parser.parse_args()
    ds_to_universal(Path(a.input_folder), Path(a.output_folder))
