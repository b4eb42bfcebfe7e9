"""The Mixture-of-Recursions model: plain torch modules, no parallelism."""

from mor_dist.model.layout import LayerLayout, make_layout
from mor_dist.model.mor import MoRModel, MoROutput, RecursionState


def build_model(cfg) -> MoRModel:
    """Model from the root config (model, routing and kv groups)."""
    return MoRModel(cfg.model, cfg.routing, cfg.kv)


__all__ = ["LayerLayout", "MoRModel", "MoROutput", "RecursionState", "build_model", "make_layout"]
