"""Parameter counts of every preset against the paper's table, and the FLOPs model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mor_dist.cli import main
from mor_dist.config import load_config
from mor_dist.model import build_model, make_layout
from mor_dist.model.accounting import count_parameters, forward_flops_per_token

PAPER = Path("configs/paper")
# MOR.md section 1: non-embedding and embedding parameters of the vanilla sizes.
VANILLA = {"135m": (106e6, 28e6), "360m": (315e6, 47e6), "730m": (654e6, 75e6), "1.7b": (1.61e9, 101e6)}
# MOR.md section 2: 360m Middle-Cycle layouts.
RECURSIVE_360M = {2: 167e6, 3: 118e6, 4: 98e6}


def close(value, target, tol=0.01):
    return abs(value - target) <= tol * target


@pytest.mark.parametrize("size", list(VANILLA))
def test_every_preset_of_a_size(size):
    non_emb, emb = VANILLA[size]
    vanilla = count_parameters(load_config(PAPER / size / "vanilla.yaml"))
    # Paper's table rounds to the shown digits; 1% covers it.
    assert close(vanilla["non_embedding"], non_emb, 0.012), vanilla
    assert close(vanilla["embedding"], emb, 0.03), vanilla
    per_layer = (vanilla["non_embedding"] - vanilla["final_norm"]) / load_config(PAPER / size / "vanilla.yaml").model.n_layers
    for nr in (2, 3, 4):
        for kind in ("recursive", "mor"):
            cfg = load_config(PAPER / size / f"{kind}_nr{nr}.yaml")
            got = count_parameters(cfg)
            lay = make_layout(cfg.model.n_layers, nr, "middle_cycle", cfg.model.pad_layers)
            # Middle-Cycle: 1 + B + 1 parameter layers (plus the routers for MoR).
            expected = lay.unique_layers * per_layer + vanilla["final_norm"]
            expected += nr * cfg.model.d_model if kind == "mor" else 0
            assert got["non_embedding"] == pytest.approx(expected, abs=0.5), (size, kind, nr)
            assert got["embedding"] == vanilla["embedding"]
            if size == "360m":
                assert close(got["non_embedding"], RECURSIVE_360M[nr]), (kind, nr, got)


def test_meta_counts_equal_a_real_model():
    cfg = load_config("configs/tiny/mor.yaml")
    real = build_model(cfg)
    counts = count_parameters(cfg)
    assert counts["total"] == sum(p.numel() for p in real.parameters())
    assert counts["shared_block"] == sum(p.numel() for p in real.shared.parameters())


def test_info_command_json(capsys):
    assert main(["info", str(PAPER / "360m/mor_nr4.yaml")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert close(info["params"]["non_embedding"], 98e6)
    assert info["layout"]["layers_per_block"] == 8 and info["layout"]["effective_depth"] == 34
    assert info["flops"]["train_per_token"] == pytest.approx(3 * info["flops"]["forward_per_token"])
    # Overrides work on the command line, and the entry point is installed.
    out = subprocess.run(
        [sys.executable, "-m", "mor_dist.cli", "info", str(PAPER / "360m/vanilla.yaml"), "model.recursions=3",
         "model.sharing=middle_cycle"], capture_output=True, text=True, check=True,
    ).stdout
    assert close(json.loads(out)["params"]["non_embedding"], 118e6)


def test_info_rejects_bad_config(capsys):
    assert main(["info", str(PAPER / "360m/vanilla.yaml"), "model.recursions=4", "model.sharing=middle_cycle"]) == 2
    assert "model.pad_layers" in capsys.readouterr().err


def test_flops_ratio_matches_paper_isoflop_budget():
    # At a fixed 20B tokens MoR Nr=2 used 12.3e18 vs vanilla 16.5e18 FLOPs (MOR.md 8).
    vanilla = forward_flops_per_token(load_config(PAPER / "360m/vanilla.yaml"))
    mor2 = forward_flops_per_token(load_config(PAPER / "360m/mor_nr2.yaml"))
    assert mor2 / vanilla == pytest.approx(12.3 / 16.5, rel=0.02)
    # Capacity-aware: less capacity, fewer FLOPs. KV sharing skips later K/V projections but its
    # queries see all recursion-1 keys (attention ~ k_r/T instead of (k_r/T)^2).
    rec3 = forward_flops_per_token(load_config(PAPER / "360m/recursive_nr3.yaml"))
    mor3 = forward_flops_per_token(load_config(PAPER / "360m/mor_nr3.yaml"))
    share3 = forward_flops_per_token(load_config(PAPER / "360m/mor_nr3.yaml", ["kv.strategy=share"]))
    assert mor3 < rec3 == pytest.approx(vanilla, rel=0.01)
    assert share3 < rec3 and share3 != mor3


def test_linear_flops_match_a_counted_forward():
    """The linear part of the FLOPs model equals torch's own FLOP counter on a real forward of the
    vanilla tiny model (attention and head removed from both sides)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = load_config("configs/tiny/vanilla.yaml", ["data.seq_len=64"])
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 64))
    with FlopCounterMode(display=False) as counter:
        model(tokens)
    counts = counter.get_flop_counts()["Global"]
    linear = counts[torch.ops.aten.mm] - 2 * 64 * cfg.model.d_model * cfg.model.vocab_size  # minus head
    m, t = cfg.model, 64
    hd = m.d_model // m.n_heads
    attn_per_layer = 2 * 2 * hd * m.n_heads * t * (t + 1) / 2
    ours = forward_flops_per_token(cfg) * t - m.n_layers * attn_per_layer
    assert ours == pytest.approx(linear, rel=1e-6)
