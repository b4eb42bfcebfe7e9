"""Llama building blocks: RMSNorm, RoPE, SwiGLU, grouped-query attention, the transformer layer.

Plain torch. Tensor parallelism later swaps the nn.Linear projections for megatron-core parallel
layers from outside; that is why head counts are read off the projection outputs at run time instead
of being stored here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mor_dist.kernels import routed_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 for bf16 stability, as Llama does.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.type_as(x) * weight


class RotaryEmbedding(nn.Module):
    """RoPE tables indexed by a token's *original* position, so gathered tokens keep their place.

    The tables are built lazily per device in fp32 and are not buffers: casting the model to bf16
    (DeepSpeed does) would otherwise round cos/sin of large angles, and they are never checkpointed.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self._tables: dict = {}
        # Built now for the CPU, and for any device the module moves to (_apply): a table first built
        # inside a compiled forward would make the next call fail the graph's guard and compile again.
        self.tables(torch.device("cpu"))

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        try:  # .to() / .cuda(): fn maps a tensor to where it goes
            moved = fn(torch.empty(0))
        except Exception:  # an fn that needs a real parameter: the table is built on first use
            return out
        if type(moved) is torch.Tensor:  # not a fake or subclass tensor (tracing), which must not be kept
            self.tables(moved.device)
        return out

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._tables:
            inv_freq = 1.0 / (
                self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim)
            )
            freqs = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float32, device=device), inv_freq)
            self._tables[key] = (freqs.cos(), freqs.sin())  # (S, D/2) each
        return self._tables[key]

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x: (B, H, K, D); pos: (B, K) original positions. Rotate-half convention (as HF Llama).

        Positions must be < max_seq_len: the config checks data.seq_len and the inference engine
        each request's length up front, so no check here (it would cost a device-to-host sync per
        call); an out-of-range index fails in the table lookup."""
        cos_t, sin_t = self.tables(x.device)
        cos = cos_t[pos].unsqueeze(1)  # (B, 1, K, D/2)
        sin = sin_t[pos].unsqueeze(1)
        x1, x2 = x.float().chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.type_as(x)


@dataclass
class TokenFrame:
    """Which tokens a layer call sees, and how its attention finds keys.

    pos: (B, K) original positions of the (gathered) tokens.
    valid: (B, K) bool, False on padding slots; None when every slot is a real token.
    kv_mode: "own" computes K/V from these tokens; "record" also stores them in kv_store (recursion 1
        under recursive KV sharing); "reuse" skips the K/V projections and attends to kv_store.
    cache: decoding only (mor_dist/inference): maps a layer call's key to a KV cache view with
        `writes`, `append(k, v, pos, valid)` and `attend(q, q_pos)`; keys then persist across calls.
        None (training, full forwards) leaves kv_mode in charge.
    """

    pos: torch.Tensor
    valid: torch.Tensor | None = None
    kv_mode: str = "own"
    kv_store: dict = field(default_factory=dict)
    cache: Any = None


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, rope: RotaryEmbedding):
        super().__init__()
        self.head_dim = head_dim
        self.wq = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.rope = rope

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, k, _ = x.shape
        return x.view(b, k, -1, self.head_dim).transpose(1, 2)  # (B, H, K, D)

    def project_qkv(self, x: torch.Tensor):
        """The q, k, v projections of x. A serving engine may give an instance one fused product
        instead (mor_dist/inference/packed_linear.py)."""
        return self.wq(x), self.wk(x), self.wv(x)

    def forward(self, x: torch.Tensor, frame: TokenFrame, key) -> torch.Tensor:
        view = frame.cache[key] if frame.cache is not None else None
        writes = view.writes if view is not None else frame.kv_mode != "reuse"
        if writes:
            q, k, v = self.project_qkv(x)
            k, v = self.rope(self._heads(k), frame.pos), self._heads(v)
        else:
            q = self.wq(x)
        q = self.rope(self._heads(q), frame.pos)
        if view is not None:
            # Incremental decoding: keys come from the cache, which holds earlier calls' tokens too.
            if writes:
                view.append(k, v, frame.pos, frame.valid)
            out = view.attend(q, frame.pos)
        elif frame.kv_mode == "reuse":
            # Recursive KV sharing: this layer's K/V from recursion 1 (all its tokens); the active
            # queries see the ones at or before their original position.
            k, v, k_pos, k_valid = frame.kv_store[key]
            out = routed_attention(q, k, v, frame.pos, k_pos, k_valid)
        else:
            if frame.kv_mode == "record":
                frame.kv_store[key] = (k, v, frame.pos, frame.valid)
            out = routed_attention(q, k, v, frame.pos, frame.pos, frame.valid, same_tokens=True)
        b, _, n, _ = out.shape
        return self.wo(out.transpose(1, 2).reshape(b, n, -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def project_gate_up(self, x: torch.Tensor):
        """The gate and up projections of x (a serving engine may fuse them, as project_qkv)."""
        return self.w_gate(x), self.w_up(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project_gate_up(x)
        return self.w_down(F.silu(gate) * up)


class TransformerLayer(nn.Module):
    """Pre-norm Llama layer: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, d_model, n_heads, n_kv_heads, head_dim, d_ff, norm_eps, rope):
        super().__init__()
        self.attn_norm = RMSNorm(d_model, norm_eps)
        self.attn = Attention(d_model, n_heads, n_kv_heads, head_dim, rope)
        self.mlp_norm = RMSNorm(d_model, norm_eps)
        self.mlp = SwiGLU(d_model, d_ff)

    def forward(self, x: torch.Tensor, frame: TokenFrame, key=None) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), frame, key)
        return h + self.mlp(self.mlp_norm(h))
