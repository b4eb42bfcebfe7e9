"""TensorBoard output (rank 0 only): scalars with descriptions, depth histograms, images, text, and
the resolved config as text and hparams.

TensorBoard names a run by its folder below --logdir, so events go one level down, into a folder
named after the run folder: `tensorboard --logdir RUN/tensorboard` lists the run as RUN's name, not
as ".". Tag groups (the part before the first "/") sort alphabetically in TensorBoard and the first
two open by default: train, train_routing, train_system, val (docs/training.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

# Shown by TensorBoard in the chart's description (the first event of a tag carries it).
DESCRIPTIONS = {
    r"train_routing/causal_agreement/r\d+": (
        "Training batches, recursion r: share of candidate tokens where the router's causal decision "
        "(what inference uses: sigmoid > 0.5) agrees with top-k selection (what training uses). Watch "
        "it: near 1.0 means inference routes as training did; falling means the model you deploy "
        "recurses differently from the one you trained (val/routing_gap shows the cost)."),
    r"train_routing/dead_tokens/r\d+": (
        "Training batches, recursion r: share of tokens top-k sent deeper that the causal decision "
        "would stop. These tokens get less compute at inference than in training; should stay near 0."),
    r"train_routing/depth_load/d\d+": "Token-choice: share of training tokens the router assigns to depth i.",
    r"train_routing/router_bias/d\d+": "Token-choice, loss-free balancing: the bias added to depth i's score.",
    r"train_routing/active_frac/r\d+": "Token-choice: share of training tokens that run recursion r.",
    r"val/loss": "Validation loss with causal routing: the decisions inference makes.",
    r"val/loss_topk": "Validation loss with top-k routing: the decisions training makes (not under pipeline stages).",
    r"val/routing_gap": (
        "val/loss - val/loss_topk: what causal routing costs against training's top-k. Near 0 when the "
        "causal decision learned top-k; growing means inference recurses differently than training."),
    r"val/depth_agreement": "Share of validation tokens whose causal depth equals their top-k depth.",
    r"val/stopped_early": "Share of validation tokens that causal routing stops at a smaller depth than top-k.",
    r"train_routing/depth": (
        "Depth of a training step's tokens under top-k routing (depth = times the shared block ran on "
        "a token). Expert-choice: fixed by routing.capacity."),
    r"val/depth_causal": "Depth of validation tokens with causal routing: what inference will do.",
    r"val/depth_topk": "Depth of validation tokens with top-k routing: what training does.",
    r"(train|val)/loss_vs_tokens": "The loss with tokens seen on the x axis (the axis TensorBoard labels 'step').",
    r"train/param_norm": "L2 norm of all parameters (every shard, counted once).",
    r"train_system/step_time_s": "Seconds per optimizer step, training only (evaluation and checkpoints excluded).",
    r"train_system/tokens_per_s": (
        "Training tokens per second, all ranks together (evaluation and checkpoints excluded)."),
    r"train_system/tokens_per_s_per_device": "train_system/tokens_per_s divided by the number of ranks.",
    r"train_system/mfu": "Model FLOPs utilization: MoR-aware training FLOPs/s over logging.peak_tflops x ranks.",
    r"train_system/gpu_mem_allocated_gib": "Rank 0's GPU: peak memory held by tensors since the previous point.",
    r"train_system/gpu_mem_reserved_gib": (
        "Rank 0's GPU: peak memory reserved by PyTorch's caching allocator since the previous point."),
    r"train_system/cpu_rss_gib": "CPU run: resident memory (RSS) of rank 0's process now.",
    r"train_system/cpu_peak_rss_gib": "CPU run: peak resident memory (RSS) of rank 0's process so far.",
    r"train_system/data_wait_s": "Seconds the loop waited for batches since the previous point.",
}
_DESCRIBED = [(re.compile(pattern + "$"), text) for pattern, text in DESCRIPTIONS.items()]


def description(tag: str) -> str | None:
    return next((text for pattern, text in _DESCRIBED if pattern.match(tag)), None)


class TensorBoardLogger:
    def __init__(self, log_dir: str | Path, enabled: bool, run_name: str | None = None):
        self.writer = None
        self.run_dir = Path(log_dir) / (run_name or Path(log_dir).resolve().parent.name or "run")
        self._started: set[str] = set()  # tags whose first event (with the description) is written
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir))

    def scalars(self, values: dict, step: int) -> None:
        """Tensor-form scalar summaries (TensorBoard's current format): its fast loader shows the
        description only for these, not for legacy simple values."""
        if self.writer is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.scalar.summary_v2 import scalar_pb

        summary = Summary()
        for tag, value in values.items():
            if value is None:
                continue
            text = description(tag) if tag not in self._started else None
            self._started.add(tag)
            summary.value.extend(scalar_pb(tag, float(value), text).value)
        if summary.value:
            self.writer.file_writer.add_summary(summary, step)

    def depth_histogram(self, tag: str, counts, step: int) -> None:
        """counts[d]: tokens at depth d, one bucket [d - 0.5, d + 0.5) per depth. Written in tensor
        form (TensorBoard's current format): its two loaders read legacy histograms differently,
        one dropping empty end buckets, the other not."""
        if self.writer is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.histogram.metadata import create_summary_metadata
        from tensorboard.util.tensor_util import make_tensor_proto

        d = np.arange(len(counts), dtype=np.float64)
        buckets = np.stack([d - 0.5, d + 0.5, np.asarray(counts, dtype=np.float64)], axis=1)
        text = description(tag) if tag not in self._started else None
        self._started.add(tag)
        value = Summary.Value(tag=tag, metadata=create_summary_metadata(display_name=tag, description=text),
                              tensor=make_tensor_proto(buckets))
        self.writer.file_writer.add_summary(Summary(value=[value]), step)

    def image(self, tag: str, hwc: np.ndarray, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, hwc, step, dataformats="HWC")

    def text(self, tag: str, markdown: str, step: int) -> None:
        """Markdown for the TEXT tab, under `tag` itself (torch's add_text appends "/text_summary")."""
        if self.writer is not None:
            from tensorboard.plugins.text.summary_v2 import text_pb

            self.writer.file_writer.add_summary(text_pb(tag, markdown), step)

    def config(self, yaml_text: str, hparams: dict, metrics: list[str], step: int) -> None:
        """The resolved config as YAML in the TEXT tab; the leaves of `hparams` (a part of the config
        tree) in the HPARAMS tab, which compares runs by them with `metrics` as columns."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        self.text("config/resolved", f"```yaml\n{yaml_text}\n```", step)
        flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in _leaves(hparams)}
        for summary in hparams_summaries(flat, {m: 0.0 for m in metrics}):
            self.writer.file_writer.add_summary(summary, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        elif value is not None:
            yield f"{prefix}{key}", value
