"""Checks OmegaConf's typing cannot express: the range of every numeric key (declared in schema.py
and data_pipeline/config.py), the allowed words of string keys, and rules that span several keys.

Each error is one line that starts with the key to change, says what is wrong and what to do.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

from omegaconf import ListConfig

from mor_dist.config.schema import MoRConfig
from mor_dist.model.layout import LayoutError, make_layout


class ConfigError(ValueError):
    """A config (or command-line flag) that cannot run; the message starts with the file, key or flag
    at fault."""


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
    "checkpoint.verify": ("sha256", "size", "none"),
    "data.verify": ("none", "size", "sha256"),
    "data.read": ("auto", "seek", "stream"),
    "parallel.activation_checkpointing": ("none", "recursion", "full"),
}


def _declared_ranges(cls, prefix: str = ""):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory):
            yield from _declared_ranges(f.default_factory, f"{prefix}{f.name}.")
        elif "range" in f.metadata:
            yield prefix + f.name, f.metadata["range"]


# Dotted key -> range spec, e.g. "optim.lr": "> 0", "data.val_fraction": "[0, 1)".
RANGES = dict(_declared_ranges(MoRConfig))


def in_range(value, spec: str) -> bool:
    """Whether a number lies in a range spec (">= a", "> a", or an interval "[a, b)" etc.). NaN and
    infinities never do: no key means anything by them."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if spec.startswith(">="):
        return value >= float(spec[2:])
    if spec.startswith(">"):
        return value > float(spec[1:])
    lo, hi = (float(v) for v in spec[1:-1].split(","))
    return (lo <= value if spec[0] == "[" else lo < value) and (value <= hi if spec[-1] == "]" else value < hi)


def _range_text(spec: str) -> str:
    return spec if spec[0] == ">" else f"in {spec}"


def range_error(name: str, value, spec: str) -> str:
    """The one-line message for a value outside its range: '<name>: <value> is out of range; ...'."""
    return f"{name}: {value} is out of range; use a value {_range_text(spec)}"


def flag_type(spec: str, kind=int):
    """An argparse `type` for a numeric flag: converts and checks the range (e.g. RANGES["data.seq_len"]
    for the flag that sets that key), so that a bad value is refused before anything runs."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}; use a value {_range_text(spec)}"
            ) from None
        if not in_range(value, spec):
            raise argparse.ArgumentTypeError(f"{value} is out of range; use a value {_range_text(spec)}")
        return value

    return convert


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _check_ranges(cfg) -> None:
    for key, spec in RANGES.items():
        value = _get(cfg, key)
        if value is None:  # an optional key left to its derived default
            continue
        if isinstance(value, (list, ListConfig)):
            for i, item in enumerate(value):
                if not in_range(item, spec):
                    raise ConfigError(range_error(f"{key}[{i}]", item, spec))
        elif not in_range(value, spec):
            raise ConfigError(range_error(key, value, spec))


def validate(cfg) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    _check_ranges(cfg)

    m, rt = cfg.model, cfg.routing
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads: {m.n_kv_heads} does not divide model.n_heads={m.n_heads}; use a divisor")
    if m.head_dim is None and m.d_model % m.n_heads:
        raise ConfigError(
            f"model.d_model: {m.d_model} is not divisible by model.n_heads={m.n_heads}; change one, or set "
            "model.head_dim"
        )
    if m.head_dim is not None and m.head_dim % 2:
        raise ConfigError(f"model.head_dim: {m.head_dim} is odd; RoPE rotates pairs, use an even size")
    if m.head_dim is None and (m.d_model // m.n_heads) % 2:
        raise ConfigError(
            f"model.d_model: {m.d_model} / model.n_heads={m.n_heads} gives an odd head size; RoPE rotates pairs, "
            "set an even model.head_dim"
        )
    try:
        layout = make_layout(m.n_layers, m.recursions, m.sharing, m.pad_layers)
    except LayoutError as e:
        raise ConfigError(str(e)) from None

    if rt.type != "none" and layout.recursions < 2:
        raise ConfigError(
            f"routing.type: {rt.type!r} needs model.recursions >= 2 (got {m.recursions}); "
            "raise model.recursions or set routing.type=none"
        )
    if rt.capacity is not None:
        if len(rt.capacity) != m.recursions:
            raise ConfigError(
                f"routing.capacity: {len(rt.capacity)} entries for model.recursions={m.recursions}; give one per step"
            )
        for i in range(1, len(rt.capacity)):
            if rt.capacity[i] > rt.capacity[i - 1]:
                raise ConfigError(
                    f"routing.capacity[{i}]: {rt.capacity[i]} exceeds routing.capacity[{i - 1}]="
                    f"{rt.capacity[i - 1]}; selection is hierarchical, capacities must not increase"
                )
    if cfg.kv.strategy == "share" and m.sharing not in ("cycle", "middle_cycle"):
        raise ConfigError(
            f"kv.strategy: 'share' reuses a layer's recursion-1 K/V, so every recursion must apply the same "
            f"layers; set model.sharing to cycle or middle_cycle (got {m.sharing!r})"
        )

    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len: {cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}; lower it or raise "
            "model.max_seq_len"
        )

    _check_sources(cfg.data.sources)

    t, p = cfg.train, cfg.parallel
    if t.flops_budget is not None and t.tokens is not None:
        raise ConfigError(
            f"train.tokens: {t.tokens:.4g} is set together with train.flops_budget={t.flops_budget}; both set the run's "
            "length, give one of them"
        )
    # Data-parallel size unknown here: what fails for every size fails now, the rest at start.
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{t.micro_batch_size}; it must be micro_batch_size x data-parallel size x accumulation steps"
        )
    if t.eval_interval > 0 and t.eval_batches < 1:
        raise ConfigError(
            f"train.eval_batches: {t.eval_batches} with train.eval_interval={t.eval_interval}; use >= 1, "
            "or train.eval_interval=0 to turn evaluation off"
        )
    if p.pipeline > 1 and p.zero_stage > 1:
        raise ConfigError(
            f"parallel.zero_stage: {p.zero_stage} cannot combine with parallel.pipeline={p.pipeline} "
            "(ZeRO-2/3 partition gradients per micro-batch, which pipeline schedules break); use zero_stage=1"
        )
    if p.pipeline > 1 and t.nan_policy == "skip":
        raise ConfigError(
            "train.nan_policy: skip cannot combine with parallel.pipeline > 1 (the pipeline engine steps the "
            "optimizer inside its schedule, before the loss can be checked); use train.nan_policy=stop"
        )
    if m.n_heads % p.tensor or m.n_kv_heads % p.tensor:
        raise ConfigError(
            f"parallel.tensor: {p.tensor} does not divide model.n_heads={m.n_heads} and "
            f"model.n_kv_heads={m.n_kv_heads}; use a common divisor"
        )
    if p.stage_recursions is not None:
        if len(p.stage_recursions) != p.pipeline:
            raise ConfigError(
                f"parallel.stage_recursions: {len(p.stage_recursions)} entries for parallel.pipeline={p.pipeline}; "
                "give one per stage"
            )
        if sum(p.stage_recursions) != layout.recursions:
            raise ConfigError(
                f"parallel.stage_recursions: {list(p.stage_recursions)} sums to {sum(p.stage_recursions)}; the "
                f"entries must sum to model.recursions={layout.recursions}"
            )
    if p.stage_layers is not None:
        passes = layout.recursions * layout.block
        if p.stage_recursions is not None:
            raise ConfigError("parallel.stage_layers: set either it or parallel.stage_recursions, not both")
        if len(p.stage_layers) != p.pipeline:
            raise ConfigError(
                f"parallel.stage_layers: {len(p.stage_layers)} entries for parallel.pipeline={p.pipeline}; "
                "give one per stage"
            )
        if sum(p.stage_layers) != passes:
            raise ConfigError(
                f"parallel.stage_layers: {list(p.stage_layers)} sums to {sum(p.stage_layers)}; the entries must "
                f"sum to the shared-layer passes, model.recursions={layout.recursions} x {layout.block} block layers "
                f"= {passes}"
            )
    if len(cfg.optim.betas) != 2:
        raise ConfigError(
            f"optim.betas: {list(cfg.optim.betas)} is not two values; Adam takes exactly two (beta1, beta2), "
            "e.g. optim.betas=[0.9,0.95]"
        )
    s = cfg.schedule
    if s.warmup_fraction + s.decay_fraction > 1:
        raise ConfigError(
            f"schedule.warmup_fraction: {s.warmup_fraction} + schedule.decay_fraction={s.decay_fraction} exceeds 1; "
            "lower one of them"
        )
    if not cfg.logging.run_dir.strip():
        raise ConfigError("logging.run_dir: empty; give the run's folder, e.g. logging.run_dir=runs/my_run")


def _check_sources(sources) -> None:
    """data.sources: each names one place and has a weight > 0; names (TensorBoard tags) are unique."""
    from mor_dist.data_pipeline.remote import display_name

    names = {}
    for i, src in enumerate(sources):
        key = f"data.sources[{i}]"
        if bool(src.dir) == bool(src.url):
            raise ConfigError(f"{key}: set one of dir or url (a prepared dataset's directory or URL)"
                              + ("" if src.dir else ", e.g. {dir: data/web, weight: 1}"))
        if not in_range(src.weight, "> 0"):
            raise ConfigError(range_error(f"{key}.weight", src.weight, "> 0"))
        name = src.name or display_name(src.dir or src.url)
        if name in names:
            raise ConfigError(f"{key}: its name {name!r} is also data.sources[{names[name]}]'s; give each a "
                              "distinct name (its TensorBoard tag is data/tokens/<name>)")
        names[name] = i
