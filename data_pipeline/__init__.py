"""Data pipeline: tokenizer, WebDataset shards + manifest, and an exactly resumable streaming loader
(local shards or URLs, one dataset or a weighted mixture).

Names are imported lazily so that `mor_dist.data_pipeline.config` (read by the config tree) does not
pull in torch or tokenizers.
"""

from importlib import import_module

_EXPORTS = {
    "DataConfig": "config",
    "SourceConfig": "config",
    "DataError": "errors",
    "prepare_dataset": "prepare",
    "prepare_from_config": "prepare",
    "train_tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "load_manifest": "manifest",
    "Manifest": "manifest",
    "TokenDataset": "loader",
    "StreamingLoader": "loader",
    "build_loader": "loader",
    "Mixture": "order",
    "data_parallel_rank": "loader",
    "verify_dataset": "verify",
    "default_corpus_files": "corpus",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
