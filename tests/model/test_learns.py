"""A tiny MoR learns real text in one process (bytes as tokens: no tokenizer needed here)."""

import time

import torch

from mor_dist.config import load_config
from mor_dist.model import build_model


def test_tiny_mor_learns_real_text(text_bytes):
    torch.manual_seed(0)
    cfg = load_config("configs/tiny/mor.yaml", ["model.vocab_size=256", "data.seq_len=64"])
    model = build_model(cfg).train()
    data = torch.tensor(list(text_bytes), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    losses, agreement = [], []
    t0 = time.time()
    for _ in range(250):
        starts = torch.randint(0, len(data) - 65, (8,), generator=gen)
        batch = torch.stack([data[s : s + 65] for s in starts.tolist()])
        out = model(batch[:, :-1], targets=batch[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.after_optimizer_step()
        losses.append(out.lm_loss.item())
        agreement.append(out.stats["causal_agreement/r2"].item())
    first, last = losses[0], sum(losses[-20:]) / 20
    print(f"lm loss {first:.3f} -> {last:.3f} in {time.time() - t0:.1f}s; causal agreement r2 "
          f"{agreement[0]:.2f} -> {sum(agreement[-20:]) / 20:.2f}")
    assert first > 5.0  # about ln(256) at initialisation
    assert last < 3.0, (first, last)
    # The aux loss teaches the causal decision to follow top-k.
    assert sum(agreement[-20:]) / 20 > 0.8
    # Validation in causal mode (inference decisions) is finite and close to the training loss.
    model.eval()
    with torch.no_grad():
        batch = data[:8 * 65].view(8, 65)
        val = model(batch[:, :-1], targets=batch[:, 1:]).lm_loss.item()
    assert val < 3.5, val
