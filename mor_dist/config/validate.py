"""Cross-key checks OmegaConf's typing cannot express. Each error names the key to change."""

from __future__ import annotations

from mor_dist.model.layout import LayoutError, make_layout


class ConfigError(ValueError):
    """A config that cannot run; the message names the file or key at fault."""


CHOICES = {
    "model.sharing": ("none", "cycle", "sequence", "middle_cycle", "middle_sequence"),
    "routing.type": ("none", "expert", "token"),
    "routing.router": ("linear", "mlp"),
    "routing.causal_method": ("aux_loss", "aux_router"),
    "routing.gating": ("weighted", "none"),
    "routing.token_func": ("softmax", "sigmoid"),
    "routing.balancing": ("loss", "loss_free", "none"),
    "kv.strategy": ("recursion_wise", "share"),
    "schedule.name": ("wsd", "cosine", "constant"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.dtype": ("auto", "fp32", "bf16"),
    "train.nan_policy": ("stop", "skip"),
    "parallel.activation_checkpointing": ("none", "recursion", "full"),
}


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(cfg) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {allowed}")

    m, rt = cfg.model, cfg.routing
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
        if getattr(m, key) < 1:
            raise ConfigError(f"model.{key}={getattr(m, key)} must be >= 1")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads}")
    if m.head_dim is None and m.d_model % m.n_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; set model.head_dim"
        )
    if (m.head_dim or m.d_model // m.n_heads) % 2:
        raise ConfigError("model.head_dim must be even for RoPE")
    try:
        layout = make_layout(m.n_layers, m.recursions, m.sharing, m.pad_layers)
    except LayoutError as e:
        raise ConfigError(str(e)) from None

    if rt.type != "none" and layout.recursions < 2:
        raise ConfigError(f"routing.type={rt.type!r} needs model.recursions >= 2 (got {m.recursions})")
    if rt.alpha is not None and rt.alpha <= 0:
        raise ConfigError(f"routing.alpha={rt.alpha} must be > 0")
    if rt.capacity is not None:
        if len(rt.capacity) != m.recursions:
            raise ConfigError(
                f"routing.capacity has {len(rt.capacity)} entries; model.recursions={m.recursions} needs one per step"
            )
        for i, c in enumerate(rt.capacity):
            if not 0.0 < c <= 1.0:
                raise ConfigError(f"routing.capacity[{i}]={c} is outside (0, 1]")
        for i in range(1, len(rt.capacity)):
            if rt.capacity[i] > rt.capacity[i - 1]:
                raise ConfigError(
                    f"routing.capacity[{i}]={rt.capacity[i]} exceeds routing.capacity[{i - 1}]="
                    f"{rt.capacity[i - 1]}: selection is hierarchical, capacities must not increase"
                )
    for key in ("capacity_warmup_steps", "max_depth_warmup_steps"):
        if getattr(rt, key) < 0:
            raise ConfigError(f"routing.{key} must be >= 0")
    if cfg.kv.strategy == "share" and m.sharing not in ("cycle", "middle_cycle"):
        raise ConfigError(
            f"kv.strategy='share' reuses a layer's recursion-1 K/V, so every recursion must apply the same "
            f"layers: model.sharing must be cycle or middle_cycle (got {m.sharing!r})"
        )

    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")

    t, p = cfg.train, cfg.parallel
    for key in ("steps", "global_batch_size", "micro_batch_size"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 1")
    for key in ("tensor", "pipeline"):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallel.{key}={getattr(p, key)} must be >= 1")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} is not one of 0, 1, 2, 3")
    if p.pipeline > 1 and p.zero_stage > 1:
        raise ConfigError(
            f"parallel.zero_stage={p.zero_stage} cannot combine with parallel.pipeline={p.pipeline}: "
            "ZeRO-2/3 partition gradients per micro-batch, which pipeline schedules break; use zero_stage=1"
        )
    if p.pipeline > 1 and t.nan_policy == "skip":
        raise ConfigError(
            "train.nan_policy=skip cannot combine with parallel.pipeline > 1: the pipeline engine steps the "
            "optimizer inside its schedule, before the loss can be checked; use train.nan_policy=stop"
        )
    if m.n_heads % p.tensor or m.n_kv_heads % p.tensor:
        raise ConfigError(
            f"parallel.tensor={p.tensor} must divide model.n_heads={m.n_heads} and model.n_kv_heads={m.n_kv_heads}"
        )
    if p.stage_recursions is not None:
        if len(p.stage_recursions) != p.pipeline:
            raise ConfigError(
                f"parallel.stage_recursions has {len(p.stage_recursions)} entries for parallel.pipeline={p.pipeline}"
            )
        if sum(p.stage_recursions) != layout.recursions or min(p.stage_recursions) < 0:
            raise ConfigError(
                f"parallel.stage_recursions={list(p.stage_recursions)} must be >= 0 and sum to "
                f"model.recursions={layout.recursions}"
            )
    for key in ("lr", "eps"):
        if getattr(cfg.optim, key) <= 0:
            raise ConfigError(f"optim.{key} must be > 0")
    s = cfg.schedule
    if not (0 <= s.warmup_fraction <= 1 and 0 <= s.decay_fraction <= 1 and s.warmup_fraction + s.decay_fraction <= 1):
        raise ConfigError("schedule.warmup_fraction and schedule.decay_fraction must lie in [0, 1] and sum to <= 1")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.keep_last must be >= 1")
