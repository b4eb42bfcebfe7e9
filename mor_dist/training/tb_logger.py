"""TensorBoard output (rank 0 only): scalars, and a picture of which tokens recursed how deep."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# Depth colours: white (exited after the unique layers) -> deep blue (every recursion).
_PALETTE = np.array(
    [[255, 255, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107], [3, 19, 43]], dtype=np.uint8
)


class TensorBoardLogger:
    def __init__(self, log_dir: str | Path, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is None:
                continue
            self.writer.add_scalar(name, float(value), step)

    def depth_panel(self, pieces: list[str], depth: torch.Tensor, max_depth: int, step: int) -> None:
        """A validation sample with each token's recursion depth, as text and as a heat strip."""
        if self.writer is None:
            return
        lines = ["depth: " + " ".join(f"**{d}**" for d in range(max_depth + 1)), ""]
        body = "".join(f"`{_visible(p)}`<sub>{int(d)}</sub> " for p, d in zip(pieces, depth.tolist()))
        self.writer.add_text("routing/sample_depths", "\n".join(lines) + body, step)
        self.writer.add_image("routing/depth_map", depth_image(depth, max_depth), step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _visible(piece: str) -> str:
    """A token as markdown code: newlines and backticks would break the panel."""
    return piece.replace("`", "'").replace("\n", "\u21b5").replace("\t", "\u2192") or " "


def depth_image(depth: torch.Tensor, max_depth: int, width: int = 32, cell: int = 12) -> np.ndarray:
    """Tokens in reading order, `width` per row, each a cell coloured by its depth."""
    d = depth.flatten().clamp(0, max_depth).numpy()
    scale = (len(_PALETTE) - 1) / max(1, max_depth)
    colours = _PALETTE[np.round(d * scale).astype(int)]
    rows = -(-len(d) // width)
    grid = np.full((rows * width, 3), 128, dtype=np.uint8)  # grey beyond the last token
    grid[: len(d)] = colours
    grid = grid.reshape(rows, width, 3)
    return np.repeat(np.repeat(grid, cell, axis=0), cell, axis=1)
