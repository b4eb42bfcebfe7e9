"""Inference: paged KV caches per recursion depth, the continuous depth-wise batching engine, decoding."""

from mor_dist.inference.decode import generate
from mor_dist.inference.engine import Request, ServingEngine

__all__ = ["Request", "ServingEngine", "generate"]
