"""Local multiple-choice tasks for lm-evaluation-harness: a task YAML pointing at JSONL files.

A doc is {"query": text, "choices": [text, ...], "gold": index}. The harness scores each choice by
the log-likelihood of `choices[i]` after `query` (no delimiter is added: put the space or newline
where the text has it) and reports acc (and acc_norm, length-normalised). `--num-fewshot K` puts
K solved docs of the fewshot split in front, separated by a blank line.

next_line_docs builds such docs from held-out text: the last lines of a passage, and which of
`choices` lines comes next (the others are lines of other passages).
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def write_mc_task(task_dir: str | Path, name: str, docs: list[dict], fewshot_docs: list[dict]) -> Path:
    """Writes TASK_DIR/NAME.yaml (+ NAME.test.jsonl, NAME.fewshot.jsonl); returns the YAML's path.
    `mor eval --tasks NAME --include-path TASK_DIR` (or lm_eval's own --include_path) finds it."""
    task_dir = Path(task_dir).resolve()
    task_dir.mkdir(parents=True, exist_ok=True)
    files = {"test": task_dir / f"{name}.test.jsonl", "train": task_dir / f"{name}.fewshot.jsonl"}
    for split, rows in (("test", docs), ("train", fewshot_docs)):
        for d in rows:
            if not 0 <= d["gold"] < len(d["choices"]):
                raise ValueError(f"{name}: gold {d['gold']} is not an index of {len(d['choices'])} choices")
        files[split].write_text("".join(json.dumps(d) + "\n" for d in rows))
    data_files = "\n".join(f"    {split}: {json.dumps(str(path))}" for split, path in files.items())
    yaml = f"""# Local multiple-choice task written by mor_dist.evaluation.tasks (no hub access needed).
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
{data_files}
test_split: test
fewshot_split: train
output_type: multiple_choice
doc_to_text: query
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    path = task_dir / f"{name}.yaml"
    path.write_text(yaml)
    return path


def next_line_docs(passages: list[str], n: int, choices: int = 4, context_lines: int = 6,
                   min_chars: int = 12, seed: int = 0) -> list[dict]:
    """Up to n docs "which line comes next", one per passage: query = up to `context_lines` lines of
    the passage (ending in a newline), choices = the true next line and `choices - 1` lines of other
    passages, each at least `min_chars` long without indentation; gold = the true line's index."""
    rng = random.Random(seed)
    split = [p.split("\n") for p in passages]
    # A passage's first and last lines may be cut (a window of a token stream): they are neither
    # asked for nor offered, or the cut ones, short and common, would be the easy picks.
    pool = [(i, ln) for i, lines in enumerate(split) for ln in lines[1:-1] if len(ln.strip()) >= min_chars]
    docs = []
    order = list(range(len(split)))
    rng.shuffle(order)
    for i in order:
        lines = split[i]
        spots = [k for k in range(1, len(lines) - 1) if len(lines[k].strip()) >= min_chars]
        if not spots or len(pool) < choices:
            continue
        k = rng.choice(spots)
        truth = lines[k]
        others: list[str] = []
        while len(others) < choices - 1:
            j, line = rng.choice(pool)
            if j != i and line != truth and line not in others:
                others.append(line)
        options = others + [truth]
        rng.shuffle(options)
        query = "\n".join(lines[max(0, k - context_lines):k]) + "\n"
        docs.append({"query": query, "choices": options, "gold": options.index(truth)})
        if len(docs) == n:
            break
    return docs
