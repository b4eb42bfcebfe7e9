"""An export folder's model and tokenizer in transformers, built from this package's own classes
(`mor eval`), never from code that lies in the folder.

An export folder made with `--hf` carries modeling_mor.py / configuration_mor.py and a config.json
whose auto_map names them; `from_pretrained(folder, trust_remote_code=True)` imports whatever those
files hold, and anyone who could write to the folder could put anything there. Here nothing of the
folder is read but its data: config.yaml (YAML), model.safetensors and tokenizer.json. The Hugging
Face files are written afresh from config.yaml into a private temporary folder beside links to those
two files, and loaded from there with mor_dist.hf.modeling_mor.MoRForCausalLM itself and
PreTrainedTokenizerFast (no Auto class, no trust_remote_code): the model `lm_eval --model hf` loads
from a folder `mor export --hf` wrote, with the code this installation holds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mor_dist.checkpoint import CheckpointError

DATA_FILES = ("model.safetensors", "tokenizer.json")


def load_hf(folder: str | Path, device: str = "cpu"):
    """(MoRForCausalLM in eval mode on `device`, PreTrainedTokenizerFast or None without a
    tokenizer.json) of an export folder (model.safetensors + config.yaml)."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from mor_dist.config import load_config
    from mor_dist.hf.export import write_hf_files
    from mor_dist.hf.modeling_mor import MoRForCausalLM
    from mor_dist.training.export import check_export

    folder = Path(folder).absolute()
    cfg = load_config(folder / "config.yaml")
    check_export(folder, cfg)  # names and shapes from the file's header: one line, not a transformers traceback
    with tempfile.TemporaryDirectory(prefix="mor-hf-") as tmp:
        tmp = Path(tmp)
        for name in DATA_FILES:
            if (folder / name).is_file():
                (tmp / name).symlink_to((folder / name).resolve())
        write_hf_files(tmp, cfg)
        model, info = MoRForCausalLM.from_pretrained(tmp, dtype=torch.float32, output_loading_info=True)
        if info.get("missing_keys") or info.get("mismatched_keys"):
            raise CheckpointError(f"{folder / 'model.safetensors'}: does not fit the Hugging Face model of "
                                  f"{folder / 'config.yaml'}: missing {sorted(info.get('missing_keys', []))[:5]}, "
                                  f"other shapes {list(info.get('mismatched_keys', []))[:5]}; export the run again")
        tok = PreTrainedTokenizerFast.from_pretrained(tmp) if (tmp / "tokenizer.json").exists() else None
    model.config._name_or_path = str(folder)  # what the harness records as the model
    return model.to(device).eval(), tok
