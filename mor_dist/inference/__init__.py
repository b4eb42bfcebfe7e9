"""Inference for MoR models: KV caches per recursion depth, cached decoding, depth-wise batching."""

from mor_dist.inference.batcher import DepthWiseBatcher, Request
from mor_dist.inference.decode import forward_chunk, generate
from mor_dist.inference.kv_cache import CacheView, KVStore, ModelKVCache

__all__ = ["CacheView", "DepthWiseBatcher", "KVStore", "ModelKVCache", "Request", "forward_chunk", "generate"]
