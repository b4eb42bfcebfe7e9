"""`python -m mor_dist.checkpoint.convert_universal ARGS`: DeepSpeed's ds_to_universal converter
(same arguments) with every torch.load it makes, in its worker processes too, going through
safe_load. Its own code calls torch.load(weights_only=False) on the checkpoint's files."""

import runpy

from mor_dist.checkpoint.safe_load import guarded_loads

if __name__ == "__main__":
    # Worker processes are forked (Linux default) and inherit the guard.
    with guarded_loads():
        runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)
