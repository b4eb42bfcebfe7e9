"""The spawned worlds, shared by the test files: every 2-rank case runs in ONE world (imports cost
~15 s per rank), likewise the 3- and 4-rank cases. Each test file asserts on its part."""

from __future__ import annotations

import pytest

from tests.parallel import workers
from mor_dist.parallel.local_world import run_world

TP_CASES = [
    ("mor", ()),  # expert-choice, recursion-wise KV
    ("mor_kvshare", ()),  # expert-choice, recursive KV sharing
    ("mor_token", ()),  # token-choice, balancing loss
    ("mor_token", ("routing.balancing=loss_free",)),  # token-choice, loss-free balancing (load all-reduce)
    ("mor", ("parallel.activation_checkpointing=full",)),  # checkpoint regions around megatron layers
    # Sequence parallelism: spans of layers sharded over the tokens (odd capacities exercise the padding).
    ("mor", ("parallel.sequence_parallel=true",)),
    ("mor_kvshare", ("parallel.sequence_parallel=true",)),
    ("mor_token", ("parallel.sequence_parallel=true",)),
    ("mor", ("parallel.sequence_parallel=true", "parallel.activation_checkpointing=recursion")),
]
ZERO_STAGES = [1, 2, 3]

PP2_CASES = [
    ("mor", ("parallel.pipeline=2",)),  # default mapping: recursions 2 | 1
    ("mor_token", ("parallel.pipeline=2",)),
    ("mor_kvshare", ("parallel.pipeline=2", "parallel.stage_recursions=[3,0]")),  # pinned: KV stays on stage 0
    ("mor", ("parallel.pipeline=2", "parallel.activation_checkpointing=recursion")),
    # Cuts inside a recursion (the block's 2 layers x 3 recursions = 6 passes): the partial block
    # output, the slots and the gate cross the stage; checkpoint regions are the spans.
    ("mor", ("parallel.pipeline=2", "parallel.stage_layers=[3,3]", "parallel.activation_checkpointing=recursion")),
    ("mor_token", ("parallel.pipeline=2", "parallel.stage_layers=[3,3]")),
    ("recursive", ("parallel.pipeline=2", "parallel.stage_layers=[1,5]")),
]
PP3_CASES = [
    ("mor", ("parallel.pipeline=3",)),  # embed+first | 3 recursions | last+head
    # A recursion on every stage: the middle stage receives and sends token-choice state.
    ("mor_token", ("parallel.pipeline=3", "parallel.stage_recursions=[1,1,1]")),
    # The middle stage receives a recursion half done and hands on another half done.
    ("mor", ("parallel.pipeline=3", "parallel.stage_layers=[1,4,1]")),
    ("mor_token", ("parallel.pipeline=3", "parallel.stage_layers=[1,4,1]")),
    # The middle stage receives between recursions and sends inside one (more floats out than in).
    ("mor", ("parallel.pipeline=3", "parallel.stage_layers=[2,3,1]")),
]
WORLD4_CASES = [
    ("mor", ("parallel.pipeline=2", "parallel.tensor=2")),
    ("mor", ("parallel.tensor=2",)),  # TP2 x DP2
    ("mor", ("parallel.pipeline=2", "parallel.tensor=2", "parallel.sequence_parallel=true")),
    ("mor", ("parallel.pipeline=2",)),  # PP2 x DP2: ZeRO-1 shards each stage's optimizer over 2 ranks
    ("mor", ("parallel.tensor=2", "parallel.zero_stage=2")),  # TP2 x DP2 under ZeRO-2 and ZeRO-3
    ("mor", ("parallel.tensor=2", "parallel.zero_stage=3", "parallel.activation_checkpointing=recursion")),
]
# Per-router and shared-block gradient norms under TP and under ZeRO-2 (gradients partitioned).
GRAD_NORM_CASES = [("parallel.tensor=2",), ("parallel.zero_stage=2",)]
# bf16 (fp32 master weights, fp32 gradient accumulation) against the fp32 single-process losses.
BF16_CASES = [("parallel.tensor=2",), ("parallel.pipeline=2",), ("parallel.zero_stage=2",), ("parallel.zero_stage=3",)]

CKPT_CASES = [("parallel.zero_stage=2",), ("parallel.zero_stage=3",), ("parallel.pipeline=2",), ("parallel.tensor=2",)]

# Resume at another layout (reshard_workers.py): each chain saves at its first layout, then loads at
# each next one. Together: TP 2 -> 1 -> 2, PP 2 -> 1, 3 -> 1 -> 3, DP 1 <-> 2, ZeRO 1 -> 2 -> 3 -> 1, from
# TP=2, PP=2 and TP2xPP2 for expert-choice, token-choice and KV sharing.
RESHARD2 = [
    ("mor", [("parallel.tensor=2",), ("parallel.zero_stage=2",), ("parallel.tensor=2", "parallel.zero_stage=3"),
             ("parallel.pipeline=2",)]),
    # (Token-choice at ZeRO-3 with two data-parallel ranks: RESHARD4, where TP2 x ZeRO-3 has dp 2.)
    ("mor_token", [("parallel.pipeline=2",), ("parallel.zero_stage=2",), ("parallel.tensor=2", "parallel.zero_stage=3")]),
    ("mor_kvshare", [("parallel.tensor=2",), ("parallel.pipeline=2", "parallel.stage_recursions=[3,0]"), ()]),
]
# Three data-parallel ranks need a global batch divisible by 3: 6 at every layout of this chain.
B6 = "train.global_batch_size=6"
RESHARD3 = [
    ("mor", [("parallel.pipeline=3", B6), ("parallel.zero_stage=2", B6),
             ("parallel.pipeline=3", "parallel.stage_recursions=[1,1,1]", B6)]),
]
RESHARD4 = [
    # The shared block moves from stage 0 to stage 1, and tensor parallelism goes.
    ("mor_kvshare", [("parallel.tensor=2", "parallel.pipeline=2", "parallel.stage_recursions=[3,0]"),
                     ("parallel.pipeline=2", "parallel.stage_recursions=[0,3]")]),
    ("mor_token", [("parallel.tensor=2", "parallel.pipeline=2"), ("parallel.tensor=2", "parallel.zero_stage=3")]),
    # Tied weights held by both stages, partitioned over two data-parallel ranks each.
    ("mor", [("parallel.pipeline=2",), ("parallel.tensor=2", "parallel.pipeline=2")]),
]


def world2_jobs(folder):
    return [
        ("tp_cases", (TP_CASES,)), ("zero_cases", (ZERO_STAGES,)), ("pp_cases", (PP2_CASES,)),
        ("ckpt_cases", (CKPT_CASES, str(folder))), ("bf16_cases", (BF16_CASES,)),
        ("grad_norm_cases", (GRAD_NORM_CASES,)),
        ("reshard_chains", (RESHARD2, str(folder / "reshard"))),
    ]


@pytest.fixture(scope="session")
def world2(tmp_path_factory):
    return run_world(workers.run_all, 2, world2_jobs(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="session")
def world3(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("reshard3"))
    return run_world(workers.run_all, 3, [("pp_cases", (PP3_CASES,)), ("reshard_chains", (RESHARD3, folder))])


@pytest.fixture(scope="session")
def world4(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("reshard4"))
    return run_world(workers.run_all, 4, [("pp_cases", (WORLD4_CASES,)), ("reshard_chains", (RESHARD4, folder))])
