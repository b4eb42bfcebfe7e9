"""docs/evaluation.md's route for benchmarks without hub access, followed step by step with the
harness's own HellaSwag task (its YAML and document processing) over rows in HellaSwag's format."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.hf.helpers import export_folder

lm_eval = pytest.importorskip("lm_eval")


def test_a_copied_benchmark_reads_local_files(tmp_path, text_bytes):
    from mor_dist.data_pipeline.tokenizer import save_tokenizer, train_tokenizer
    from mor_dist.evaluation.harness import evaluate

    # Steps 1-2: the splits as JSONL (here written by the test, in the dataset's own fields).
    data = tmp_path / "hellaswag"
    data.mkdir()
    rows = [{"activity_label": f"Activity {i}", "ctx_a": f"A person picks up item {i}.", "ctx_b": "they",
             "endings": [f"put it down {k} [title] again." for k in range(4)], "label": str(i % 4)}
            for i in range(6)]
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Step 3: the task's folder from the harness.
    src = Path(lm_eval.__file__).parent / "tasks" / "hellaswag"
    local = tmp_path / "local_tasks"
    local.mkdir()
    for name in ("hellaswag.yaml", "utils.py"):
        shutil.copy(src / name, local / name)
    # Step 4: rename, drop the tags, read the local files.
    text = (local / "hellaswag.yaml").read_text()
    text = re.sub(r"(?m)^tag:\n(  - .*\n)+", "", text)
    text = text.replace("task: hellaswag\n", "task: hellaswag_local\n")
    text = text.replace("dataset_path: Rowan/hellaswag\n", "dataset_path: json\ndataset_kwargs:\n  data_files:\n"
                        f"    train: {data / 'train.jsonl'}\n    validation: {data / 'validation.jsonl'}\n")
    (local / "hellaswag.yaml").write_text(text)
    # Step 5.
    tok = train_tokenizer([text_bytes[:50_000].decode("utf-8", "ignore")], 300)
    save_tokenizer(tok, tmp_path / "tok.json")
    export_folder(tmp_path / "export", "expert", tokenizer=tmp_path / "tok.json")
    res = evaluate(tmp_path / "export", ["hellaswag_local"], num_fewshot=1, include_paths=[str(local)],
                   log_samples=True)
    assert res["n-samples"]["hellaswag_local"]["effective"] == 6
    first = res["samples"]["hellaswag_local"][0]
    assert first["arguments"][0][0].endswith("Activity 0: A person picks up item 0. They")  # utils.process_docs ran
    assert first["arguments"][0][1] == " put it down 0. again."
    assert 0 <= res["results"]["hellaswag_local"]["acc,none"] <= 1
