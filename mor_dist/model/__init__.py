"""The Mixture-of-Recursions model: plain torch modules, no parallelism.

The layout arithmetic (layout.py) imports without torch; the modules load on first use, so that
commands which only read a config (`mor submit`, `mor status`, `mor config`) start fast.
"""

from mor_dist.model.layout import LayerLayout, make_layout


def build_model(cfg):
    """Model from the root config (model, routing and kv groups)."""
    from mor_dist.model.mor import MoRModel

    return MoRModel(cfg.model, cfg.routing, cfg.kv)


def __getattr__(name):
    if name in ("MoRModel", "MoROutput", "RecursionState"):
        from mor_dist.model import mor

        return getattr(mor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LayerLayout", "MoRModel", "MoROutput", "RecursionState", "build_model", "make_layout"]
