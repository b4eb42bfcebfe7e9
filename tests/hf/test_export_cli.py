"""`mor export RUN -o OUT --hf` on a real run folder: a folder transformers loads, that mor still loads."""

import json

import pytest
import torch

from mor_dist.cli import main
from mor_dist.inference.loading import load_for_inference

transformers = pytest.importorskip("transformers")


def test_export_hf_folder_loads_in_transformers_and_in_mor(trained_run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(trained_run), "-o", str(out), "--hf"]) == 0
    for name in ("config.json", "generation_config.json", "model.safetensors", "modeling_mor.py",
                 "configuration_mor.py", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mor" and config["auto_map"]["AutoModelForCausalLM"] == "modeling_mor.MoRForCausalLM"
    assert (config["routing_type"], config["recursions"], config["kv_strategy"]) == ("expert", 3, "recursion_wise")

    model, tok = load_for_inference(out)  # the same folder still serves `mor generate`
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    text = "def parse(line):\n    return line.split()"
    ids = hf_tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == tok.encode(text).ids
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids, mode="causal").logits, rtol=0, atol=1e-5)
    # A folder that is not a run folder is one line, exit 2.
    capsys.readouterr()
    assert main(["export", str(tmp_path / "nothing"), "-o", str(tmp_path / "x"), "--hf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mor: ") and err.count("\n") == 1, err
