"""The Hugging Face export, loaded by the real transformers: same logits as mor's causal forward
(1e-5, fp32), generate() with its KV cache = `mor generate`, padding, and the cache's per-depth K/V."""

from __future__ import annotations

import ast

import pytest
import torch

from mor_dist.cli import main
from tests.hf.helpers import MODELS, export_folder, tokens

transformers = pytest.importorskip("transformers")


def load_hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


@pytest.mark.parametrize("key", list(MODELS))
def test_logits_equal_mor_causal_forward(tmp_path, key):
    model, _ = export_folder(tmp_path, key)
    hf = load_hf(tmp_path)
    assert hf.dtype == torch.float32 and type(hf).__name__ == "MoRForCausalLM"
    seq = torch.tensor([tokens(40, seed=3), tokens(40, seed=4)])
    with torch.no_grad():
        ref = model(seq, mode="causal")
        got = hf(seq)
    torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=1e-5)
    if key.startswith(("expert", "token")):
        assert len(ref.depth.unique()) >= 3, "routing too uniform to test anything"


@pytest.mark.parametrize("key", ["vanilla", "recursive_share", "expert", "expert_share", "expert_aux_router",
                                 "token", "token_share_sigmoid"])
def test_generate_equals_mor_generate(tmp_path, capsys, key):
    """Greedy generate() with the model's own KV cache gives `mor generate`'s tokens, and each step's
    logits are the full causal forward's over the finished sequence."""
    model, _ = export_folder(tmp_path, key)
    hf = load_hf(tmp_path)
    prompt, n = tokens(9, seed=5), 12
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      output_logits=True, return_dict_in_generate=True)
    got = out.sequences[0, len(prompt):].tolist()
    assert main(["generate", str(tmp_path), "--ids", "--prompt", ",".join(map(str, prompt)),
                 "--max-new-tokens", str(n)]) == 0
    assert got == [int(x) for x in capsys.readouterr().out.strip().split(",")]
    with torch.no_grad():
        full = model(out.sequences[:, :-1], mode="causal").logits[0, len(prompt) - 1:]
    torch.testing.assert_close(torch.cat(out.logits), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("key", ["expert", "token_share_sigmoid"])
def test_left_padded_batch_equals_each_row_alone(tmp_path, key):
    """Padding writes no K/V and takes no routing decision: a left-padded batch generates what each
    prompt generates alone, and a right-padded forward gives each row's own logits."""
    export_folder(tmp_path, key)
    hf = load_hf(tmp_path)
    prompts = [tokens(5, seed=11), tokens(13, seed=12)]
    ids = torch.tensor([[1] * 8 + prompts[0], prompts[1]])
    mask = torch.tensor([[0] * 8 + [1] * 5, [1] * 13])
    batch = hf.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    for row, p in enumerate(prompts):
        alone = hf.generate(torch.tensor([p]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert batch[row, -8:].tolist() == alone[0, len(p):].tolist()
    right = torch.tensor([prompts[0] + [1] * 8, prompts[1]])
    with torch.no_grad():
        padded = hf(right, attention_mask=torch.tensor([[1] * 5 + [0] * 8, [1] * 13])).logits
        alone = hf(torch.tensor([prompts[0]])).logits
    torch.testing.assert_close(padded[0, :5], alone[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("key, share", [("expert", False), ("expert_share", True), ("token", False)])
def test_cache_holds_kv_only_at_the_depths_a_token_reached(tmp_path, key, share):
    model, _ = export_folder(tmp_path, key)
    hf = load_hf(tmp_path)
    seq = torch.tensor([tokens(30, seed=7)])
    with torch.no_grad():
        depth = model(seq, mode="causal").depth[0]
        cache = hf(seq, use_cache=True).cache
    nr, block = model.layout.recursions, model.layout.block
    assert int(cache.prefix_site(0).written.sum()) == 30 and int(cache.suffix_site(0).written.sum()) == 30
    for r in range(nr):
        for j in range(block):
            written = cache.shared_site(j, r).written[0]
            # Recursion-wise: depth r+1 holds exactly the tokens that reached it; share: recursion 1's.
            want = depth > (0 if share else r)
            assert torch.equal(written, want), (r, j)
    if share:
        assert len(cache.layers) == model.layout.prefix + block + model.layout.suffix


def test_autotokenizer_loads_the_export(tmp_path, text_bytes):
    from mor_dist.data_pipeline.tokenizer import save_tokenizer, train_tokenizer

    tok = train_tokenizer([text_bytes[:100_000].decode("utf-8", "ignore")], 400)
    save_tokenizer(tok, tmp_path / "tok.json")
    export_folder(tmp_path / "export", "expert", tokenizer=tmp_path / "tok.json")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export", trust_remote_code=True)
    text = "def main(argv):\n    return len(argv)<|endoftext|>"
    assert hf_tok(text).input_ids == tok.encode(text).ids
    assert hf_tok.decode(hf_tok(text).input_ids) == text
    assert (hf_tok.eos_token, hf_tok.eos_token_id) == ("<|endoftext|>", tok.token_to_id("<|endoftext|>"))
    assert (hf_tok.pad_token, hf_tok.pad_token_id) == ("<|pad|>", tok.token_to_id("<|pad|>"))
    config = transformers.AutoConfig.from_pretrained(tmp_path / "export", trust_remote_code=True)
    assert (config.eos_token_id, config.pad_token_id) == (hf_tok.eos_token_id, hf_tok.pad_token_id)


def test_modeling_files_need_only_torch_and_transformers(tmp_path):
    export_folder(tmp_path, "vanilla")
    for name in ("modeling_mor.py", "configuration_mor.py"):
        tree = ast.parse((tmp_path / name).read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module}
        assert roots <= {"__future__", "torch", "transformers"}, (name, roots)
