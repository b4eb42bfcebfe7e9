"""Layer layout of a (recursive) model from its sharing strategy -- pure arithmetic, no tensors.

A model is: `prefix` unique layers, then Nr recursion steps, then `suffix` unique layers. The shared
parameters are `block` layers; step r applies the shared layers listed in `schedule[r]`. For Cycle
sharing every step applies the same block [0..B-1]; for Sequence sharing each shared layer repeats Nr
times in a row and a step is the next B entries of that sequence. Routers act between steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SHARING = ("none", "cycle", "sequence", "middle_cycle", "middle_sequence")


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class LayerLayout:
    prefix: int  # unique layers before the recursions
    block: int  # B: shared parameter layers (and layer calls per recursion step)
    recursions: int  # Nr
    suffix: int  # unique layers after the recursions
    schedule: tuple  # schedule[r] (0-based r): shared-layer indices applied at step r, in order
    sharing: str

    @property
    def effective_depth(self) -> int:
        """Layer applications for a token that goes through every recursion."""
        return self.prefix + self.block * self.recursions + self.suffix

    @property
    def unique_layers(self) -> int:
        """Parameter-holding layers."""
        return self.prefix + self.block + self.suffix


def make_layout(n_layers: int, recursions: int, sharing: str, pad_layers: bool = False) -> LayerLayout:
    L, nr = n_layers, recursions
    if sharing not in SHARING:
        raise LayoutError(f"model.sharing={sharing!r} is not one of {SHARING}")
    if nr < 1:
        raise LayoutError(f"model.recursions={nr} must be >= 1")
    if sharing == "none":
        if nr != 1:
            raise LayoutError(
                f"model.recursions={nr} needs a sharing strategy: set model.sharing to one of {SHARING[1:]}"
            )
        return LayerLayout(prefix=L, block=0, recursions=0, suffix=0, schedule=(), sharing=sharing)
    middle = sharing.startswith("middle")
    shared_depth = L - 2 if middle else L  # layers the recursions replace
    if shared_depth < nr:
        raise LayoutError(f"model.n_layers={L} leaves {shared_depth} layers to share over model.recursions={nr}")
    if shared_depth % nr and not pad_layers:
        raise LayoutError(
            f"model.n_layers={L} gives {shared_depth} {'middle ' if middle else ''}layers, not divisible by "
            f"model.recursions={nr}; set model.pad_layers=true to add layers "
            f"({math.ceil(shared_depth / nr) * nr} instead) or choose another model.recursions"
        )
    B = math.ceil(shared_depth / nr)
    if sharing.endswith("cycle"):
        schedule = tuple(tuple(range(B)) for _ in range(nr))
    else:  # sequence: layer i of the expanded stack uses shared layer i // Nr
        schedule = tuple(tuple((r * B + j) // nr for j in range(B)) for r in range(nr))
    edge = 1 if middle else 0
    return LayerLayout(prefix=edge, block=B, recursions=nr, suffix=edge, schedule=schedule, sharing=sharing)
