"""`mor eval`: lm-evaluation-harness, offline, on a multiple-choice task these tests write; its
accuracy recomputed by hand from mor's own model."""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest
import torch

from mor_dist.cli import main
from mor_dist.evaluation.tasks import next_line_docs, write_mc_task
from mor_dist.inference.loading import load_for_inference
from tests.hf.helpers import export_folder
from tests.training.conftest import tb_scalars

pytest.importorskip("lm_eval")


def word_docs(text: str, n: int) -> list[dict]:
    """Which word comes next: 7 words of the text, the true 8th and two words from elsewhere."""
    words = [w for w in text.split() if w.isalpha() and len(w) > 3][: 12 * n]
    docs = []
    for i in range(n):
        ctx = words[12 * i: 12 * i + 7]
        options = [words[12 * i + 7], words[(12 * i + 40) % len(words)], words[(12 * i + 77) % len(words)]]
        gold = i % 3
        options[0], options[gold] = options[gold], options[0]
        docs.append({"query": " ".join(ctx), "choices": [" " + o for o in options], "gold": gold})
    return docs


def loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) as lm-eval's HF model computes it: trailing whitespace of the
    context moves to the continuation, which is the tail of the pair's joint encoding."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation).ids
    n_ctx = len(tok.encode(context).ids)
    with torch.no_grad():
        logp = model(torch.tensor([whole[:-1]]), mode="causal").logits[0].log_softmax(-1)
    return sum(float(logp[i - 1, t]) for i, t in enumerate(whole) if i >= n_ctx)


def test_mor_eval_on_a_run_folder(trained_run, tiny_dataset, tmp_path, capsys):
    model, tok = load_for_inference(trained_run)
    text = (tiny_dataset.parent / "corpus.txt").read_text()
    docs = word_docs(text, 12)
    for d in docs:  # the hand computation below splits context and choice exactly as the tokens do
        pair = tok.encode(d["query"]).ids + tok.encode(d["choices"][0]).ids
        assert tok.encode(d["query"] + d["choices"][0]).ids == pair
    write_mc_task(tmp_path / "tasks", "mor_probe", docs, docs[:3])

    assert main(["eval", str(trained_run), "--tasks", "mor_probe", "--include-path", str(tmp_path / "tasks"),
                 "--num-fewshot", "0", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "|mor_probe|" in out and "|acc " in out  # the harness's own table

    picks = [max(range(3), key=lambda i: loglikelihood(model, tok, d["query"], d["choices"][i])) for d in docs]
    by_hand = sum(p == d["gold"] for p, d in zip(picks, docs)) / len(docs)
    (result,) = sorted((trained_run / "eval").glob("step_5-*.json"))
    record = json.loads(result.read_text())
    assert record["results"]["mor_probe"]["acc,none"] == pytest.approx(by_hand, abs=1e-9)
    assert record["mor"]["step"] == 5 and record["n-samples"]["mor_probe"]["effective"] == 12
    assert tb_scalars(trained_run)["eval/mor_probe/acc"] == {5: pytest.approx(by_hand, abs=1e-6)}


def test_few_shot_loglikelihoods_are_the_models(trained_run, tmp_path):
    """With solved examples in front (the harness's few-shot sampler), every log-likelihood the harness
    used is mor's own, and acc follows from them; the task is built from held-out code lines."""
    from mor_dist.evaluation.harness import evaluate

    export = tmp_path / "export"
    assert main(["export", str(trained_run), "-o", str(export)]) == 0  # no --hf: `mor eval` does not need them
    model, tok = load_for_inference(export)
    lines = "".join(inspect.getsource(m) for m in (json.decoder, json.encoder, textwrap)).split("\n")
    passages = ["\n".join(lines[i:i + 12]) for i in range(0, len(lines), 12)]  # real code, 12 lines each
    docs = next_line_docs(passages, 8, choices=3, context_lines=1, seed=1)
    assert len(docs) == 8
    write_mc_task(tmp_path / "tasks", "mor_lines", docs[2:], docs[:2])
    results = evaluate(export, ["mor_lines"], num_fewshot=2, include_paths=[str(tmp_path / "tasks")],
                       batch_size=4, log_samples=True)
    correct = []
    for s in results["samples"]["mor_lines"]:
        assert s["arguments"][0][0].count("\n\n") >= 2  # two solved examples in front
        got = [r[0] for r in s["filtered_resps"]]
        want = [loglikelihood(model, tok, ctx, cont) for ctx, cont in s["arguments"]]
        assert got == pytest.approx(want, abs=1e-4)
        correct.append(max(range(len(want)), key=want.__getitem__) == s["target"])
    assert results["results"]["mor_lines"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    assert not (export / "config.json").exists() and results["mor"]["step"] == 5  # nothing added to the folder


def test_mistakes_are_one_line(tmp_path, capsys):
    for argv in (["eval", str(tmp_path), "--tasks", "x"],  # neither a run nor an export folder
                 ["eval", str(tmp_path), "--tasks", " , "],
                 ["eval", str(tmp_path), "--tasks", "x", "--device", "tpu"],
                 ["eval", str(tmp_path), "--tasks", "x", "--limit", "0"]):
        try:
            code = main(argv)
        except SystemExit as e:  # flag errors exit from argparse
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("mor: ") and err.count("\n") == 1, err


def test_task_data_out_of_reach_is_one_line(tmp_path, capsys):
    """Hub data on a machine without hub access (the tests run with HF_*_OFFLINE=1): one line that
    says where the way round is."""
    from mor_dist.data_pipeline.tokenizer import save_tokenizer, train_tokenizer

    export_folder(tmp_path / "export", "vanilla")
    yaml = write_mc_task(tmp_path / "tasks", "hub_task", [{"query": "a", "choices": [" b", " c"], "gold": 0}], [])
    argv = ["eval", str(tmp_path / "export"), "--tasks", "hub_task", "--include-path", str(tmp_path / "tasks")]
    assert main(argv) == 2
    assert "tokenizer.json: missing" in capsys.readouterr().err
    save_tokenizer(train_tokenizer(["def f(x):\n    return x\n" * 50], 300), tmp_path / "export" / "tokenizer.json")
    text = yaml.read_text()
    yaml.write_text(text[:text.index("dataset_path:")] + "dataset_path: mor-tests/not-on-this-machine\n"
                    + text[text.index("test_split:"):])
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().split("\n")[-1]  # after the loader's progress bar
    assert last.startswith("mor: --tasks: the data of hub_task could not be loaded (Couldn't reach"), last



def test_code_in_the_export_folder_never_runs(tmp_path, capsys):
    """An export folder is data: Python put into its modeling/configuration files, or any .py its
    config.json's auto_map (or tokenizer_config.json's) names, is never imported by `mor eval`, which
    scores the model this installation's code builds from config.yaml and model.safetensors."""
    from mor_dist.data_pipeline.tokenizer import save_tokenizer, train_tokenizer

    save_tokenizer(train_tokenizer(["def f(x):\n    return x\n" * 50], 300), tmp_path / "tok.json")
    export = tmp_path / "export"
    model, _ = export_folder(export, "expert", tokenizer=tmp_path / "tok.json")
    marks = {name: tmp_path / f"PWNED_{name}" for name in ("modeling", "configuration", "auto_map", "tokenizer")}

    def touch(name):
        return f"\nimport pathlib; pathlib.Path({str(marks[name])!r}).touch()\n"

    for name in ("modeling", "configuration"):
        with open(export / f"{name}_mor.py", "a") as f:
            f.write(touch(name))
    (export / "evil_config.py").write_text(touch("auto_map") + "from .configuration_mor import MoRConfig\n")
    (export / "evil_tok.py").write_text(touch("tokenizer") + "from transformers import PreTrainedTokenizerFast\n")
    config = json.loads((export / "config.json").read_text())
    config["auto_map"]["AutoConfig"] = "evil_config.MoRConfig"
    (export / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((export / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": [None, "evil_tok.PreTrainedTokenizerFast"]}
    (export / "tokenizer_config.json").write_text(json.dumps(tok_config))
    before = {p.name: p.read_bytes() for p in export.iterdir()}

    docs = [{"query": "def f(x", "choices": ["):", " +"], "gold": 0}] * 2
    write_mc_task(tmp_path / "tasks", "mor_safe", docs, docs[:1])
    assert main(["eval", str(export), "--tasks", "mor_safe", "--include-path", str(tmp_path / "tasks"),
                 "--limit", "2", "--device", "cpu"]) == 0
    assert "|mor_safe|" in capsys.readouterr().out
    assert not [m.name for m in marks.values() if m.exists()]
    # Nothing is written into the folder (the Hugging Face files are made in a private temporary one).
    assert {p.name: p.read_bytes() for p in export.iterdir() if p.name != "eval"} == before


def test_a_request_lm_eval_refuses_is_one_line(tmp_path, capsys):
    """A choice the tokenizer merges into the prompt's last token encodes to no tokens of its own, which
    trips lm-eval's sanity assert (a traceback before)."""
    from mor_dist.data_pipeline.tokenizer import save_tokenizer, train_tokenizer

    save_tokenizer(train_tokenizer(["def f(x):\n    return x\n" * 50], 300), tmp_path / "tok.json")
    export_folder(tmp_path / "export", "vanilla", tokenizer=tmp_path / "tok.json")
    docs = [{"query": "de", "choices": ["f", " +"], "gold": 0}]  # "de" + "f" is the one token "def"
    write_mc_task(tmp_path / "tasks", "mor_empty", docs, docs)
    assert main(["eval", str(tmp_path / "export"), "--tasks", "mor_empty", "--include-path", str(tmp_path / "tasks"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    # Among the harness's progress bars (the last one leaves its line open).
    said = [line[line.index("mor: "):] for line in err.replace("\r", "\n").split("\n") if "mor: " in line]
    assert len(said) == 1 and "Traceback" not in err, err
    assert said[0].startswith("mor: --tasks: a request of mor_empty fails lm-eval's check `assert len(continuation_enc)")
