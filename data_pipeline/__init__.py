"""Sharded, streaming, exactly-resumable data pipeline for pretraining (issue 3).

The names below are imported from their modules on first use (PEP 562): importing one light module
of the package, as the CLI does for the data commands' defaults, must not import torch and datasets
with the loader.
"""
import importlib

_MODULE_OF = {
    "DataConfig": "config", "SourceConfig": "config", "DataError": "errors", "PipelineLoader": "loader",
    "build_dataloader": "loader", "largest_token_ids": "loader", "load_tokenizer": "tokenizer", "prepare_data": "corpus",
    "prepare_tokenizer": "tokenizer", "EOD": "tokenizer", "PAD": "tokenizer", "MASK": "tokenizer",
    "SPECIAL_TOKENS": "tokenizer",
}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value
