"""A Parallax checkpoint read for its Hugging Face twin: what `parallax export` and `parallax generate`
share, so both accept the same checkpoints and refuse the others with the same line."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from launcher.config import RunConfig


@dataclass
class TwinCheckpoint:
    path: Path  # the checkpoint itself, not its run
    cfg: RunConfig  # the config it was trained with
    tokenizer: Tokenizer
    vocab_size: int  # the true vocabulary (model.vocab_size, else the tokenizer's); the checkpoint pads it


def read_twin_checkpoint(path: Path, step: Optional[int], action: str) -> TwinCheckpoint:
    """The checkpoint of `step` (default: the newest complete one) of a run, or `path` itself; checked
    before its weights are read, so a model with no exact twin costs one line: "cannot ACTION PATH: why"."""
    from data_pipeline import load_tokenizer
    from launcher.config import load_config
    from models.huggingface import HuggingFaceError, check_vocabulary, twin_for
    from parallel.checkpoint import CheckpointError, find_checkpoint

    path = find_checkpoint(Path(path), step)
    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"checkpoint {path} has no config.yaml; it was not written by parallax train")
    cfg = load_config(path / "config.yaml")
    try:
        twin_for(cfg.model)
        tokenizer = load_tokenizer(cfg.data)
        vocab_size = cfg.model.vocab_size or tokenizer.get_vocab_size()
        check_vocabulary(vocab_size, tokenizer)
    except HuggingFaceError as e:
        raise HuggingFaceError(f"cannot {action} {path}: {e}") from None
    return TwinCheckpoint(path, cfg, tokenizer, vocab_size)
