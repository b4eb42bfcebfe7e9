"""Merge a tensor- and/or pipeline-parallel checkpoint into the state dict of the single-device
MoRModel. Pure tensor work on the saved files and their key names: no process group, no megatron or
DeepSpeed import, so `mor export` runs in one process.

Files (ZeRO stage 0-2: the model-states files hold each TP rank's whole fp32 weights and buffers):
- no pipeline: `mp_rank_YY_model_states.pt`, ["module"] = the TP-parallel model's state dict;
- pipeline: `layer_XX-model_YY-model_states.pt`, one per PipelineModule layer XX and TP rank YY
  (pipeline.build_layers). Their names map back to the model's as follows:
    * tied layers (stages.TiedWeights) keep their module under "module.": "module.weight" is the
      embedding (embed.weight), "module.<i>.*" the shared block (shared.<i>.*). Every stage that
      holds a tied weight saves a copy (the tied head saves the embedding again); they are equal
      (DeepSpeed sums the tied gradients), the first is kept.
    * a Recursions layer numbers its routers from its first recursion: its routers.<j> is
      routers.<j + routers saved by earlier layers>;
    * every other name (prefix.*, token_router.*, suffix.*, norm.*, head.*) is the model's own;
      train_step is saved by every stage, the first copy is kept.

Tensor parallelism (tensor_parallel.py) wraps parallel linears as `<name>.inner` (plus an
`_extra_state` entry, dropped) and shards them; the shards are concatenated along:
    dim 0: attn.wq/wk/wv, mlp.w_gate/w_up (column-parallel), head, embed (vocab-parallel)
    dim 1: attn.wo, mlp.w_down (row-parallel)
Everything else (norms, routers, buffers) is replicated: TP rank 0's copy.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from mor_dist.checkpoint.safe_load import safe_load

log = logging.getLogger("mor.export")

_COLUMN = ("attn.wq", "attn.wk", "attn.wv", "mlp.w_gate", "mlp.w_up")
_ROW = ("attn.wo", "mlp.w_down")
_LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")


def tp_split_dim(name: str) -> int | None:
    """Dimension along which tensor parallelism shards the model weight `name` (None: replicated)."""
    if name in ("embed.weight", "head.weight"):
        return 0
    module, _, leaf = name.rpartition(".")
    if leaf != "weight":
        return None
    if any(module.endswith("." + m) for m in _COLUMN):
        return 0
    if any(module.endswith("." + m) for m in _ROW):
        return 1
    return None


def _load(path: Path) -> dict:
    return safe_load(path)


def _add(out: dict, name: str, value, source: Path) -> None:
    """Record one saved tensor under its model name; a repeated copy must match the first."""
    if value is None or name.endswith("._extra_state"):
        return
    name = name.replace(".inner.", ".")
    if name not in out:
        out[name] = value
    elif not torch.equal(out[name], value):
        diff = (out[name].double() - value.double()).abs().max().item()
        log.warning("%s differs between copies (max |diff| %.3g, %s); keeping the first", name, diff, source)


def _pipeline_rank_state(folder: Path, tp_rank: int) -> dict:
    files = sorted(
        (int(m.group(1)), folder / m.group(0))
        for m in map(_LAYER_FILE.fullmatch, (p.name for p in folder.iterdir()))
        if m and int(m.group(2)) == tp_rank
    )
    out, routers_before = {}, 0
    for _, path in files:
        saved, seen = _load(path), set()
        for key, value in saved.items():
            if key.startswith("module."):  # tied layer
                rest = key[len("module."):]
                name = "embed.weight" if rest == "weight" else "shared." + rest
            elif key.startswith("routers."):
                _, j, rest = key.split(".", 2)
                seen.add(int(j))
                name = f"routers.{int(j) + routers_before}.{rest}"
            else:
                name = key
            _add(out, name, value, path)
        routers_before += len(seen)
    return out


def read_rank_state(folder: Path, tp_rank: int, pp: int) -> dict:
    """What the model files of one TP rank hold, by model name (weights and buffers under ZeRO 0-2;
    under ZeRO-3 the weights are empty placeholders and only the buffers are real)."""
    from mor_dist.checkpoint import CheckpointError

    if pp > 1:
        return _pipeline_rank_state(folder, tp_rank)
    names = (f"mp_rank_{tp_rank:02d}_model_states.pt", f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt")
    path = next((folder / n for n in names if (folder / n).is_file()), None)
    if path is None:
        raise CheckpointError(f"{folder / names[0]} is missing: every TP rank writes one model-states file")
    state = {}
    for key, value in _load(path)["module"].items():
        _add(state, key, value, path)
    return state


def merge_parallel(folder: Path, tp: int, pp: int) -> dict:
    """fp32 state dict of the single-device model from a TP/PP checkpoint folder (ZeRO 0-2)."""
    from mor_dist.checkpoint import CheckpointError

    ranks = []
    for r in range(tp):
        state = read_rank_state(folder, r, pp)
        if not state:
            raise CheckpointError(f"{folder} holds no model weights for TP rank {r}")
        ranks.append(state)
    if any(set(s) != set(ranks[0]) for s in ranks[1:]):
        raise CheckpointError(f"{folder}: the TP ranks saved different tensors")
    half = sorted({str(v.dtype) for v in ranks[0].values() if v.dtype in (torch.bfloat16, torch.float16)})
    if half:
        # The fp32 master weights sit in the ZeRO optimizer partitions; the model files hold what
        # the forward used, which is what inference with this export should match anyway.
        log.warning("%s holds %s model weights: the export is their fp32 cast, not the optimizer's "
                    "fp32 master copy", folder, "/".join(half))
    merged = {}
    for name, first in ranks[0].items():
        dim = tp_split_dim(name) if tp > 1 else None
        value = torch.cat([s[name] for s in ranks], dim=dim) if dim is not None else first
        merged[name] = value.float() if value.is_floating_point() else value
    return merged
