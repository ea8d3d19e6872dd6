"""Sharded, streaming, exactly-resumable data pipeline for pretraining (issue 3)."""

from .config import DataConfig, SourceConfig
from .corpus import prepare_data
from .errors import DataError
from .loader import PipelineLoader, build_dataloader
from .tokenizer import EOD, PAD, SPECIAL_TOKENS, load_tokenizer, prepare_tokenizer

__all__ = [
    "DataConfig", "SourceConfig", "DataError", "PipelineLoader", "build_dataloader",
    "load_tokenizer", "prepare_data", "prepare_tokenizer", "EOD", "PAD", "SPECIAL_TOKENS",
]
