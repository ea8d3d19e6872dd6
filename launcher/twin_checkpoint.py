"""A Parallax checkpoint read for the commands that use its model outside training: what `parallax export`
and `parallax generate` share, so both accept the same checkpoints and refuse the others with the same line.
Export and most of generate need its Hugging Face twin (read_twin_checkpoint); generate runs a recurrent
memory model, which has none, itself (launcher/memory_generate.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from launcher.config import RunConfig


@dataclass
class CheckpointModel:
    path: Path  # the checkpoint itself, not its run
    cfg: RunConfig  # the config it was trained with
    tokenizer: Tokenizer
    vocab_size: int  # the true vocabulary (model.vocab_size, else the tokenizer's); the checkpoint pads it


def read_checkpoint(path: Path, step: Optional[int], action: str) -> CheckpointModel:
    """The checkpoint of `step` (default: the newest complete one) of a run, or `path` itself, with its config
    and tokenizer; checked before its weights are read, so a tokenizer the model cannot score costs one line:
    "cannot ACTION PATH: why"."""
    from data_pipeline import load_tokenizer
    from launcher.config import load_config
    from models.huggingface import HuggingFaceError, check_vocabulary
    from parallel.checkpoint import CheckpointError, find_checkpoint

    path = find_checkpoint(Path(path), step)
    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"checkpoint {path} has no config.yaml; it was not written by parallax train")
    cfg = load_config(path / "config.yaml")
    tokenizer = load_tokenizer(cfg.data)
    vocab_size = cfg.model.vocab_size or tokenizer.get_vocab_size()
    try:
        check_vocabulary(vocab_size, tokenizer)
    except HuggingFaceError as e:
        raise HuggingFaceError(f"cannot {action} {path}: {e}") from None
    return CheckpointModel(path, cfg, tokenizer, vocab_size)


def check_twin(checkpoint: CheckpointModel, action: str) -> None:
    """A model with no exact twin (a memory model, or options no twin has) costs one line naming why."""
    from models.huggingface import HuggingFaceError, twin_for

    try:
        twin_for(checkpoint.cfg.model)
    except HuggingFaceError as e:
        raise HuggingFaceError(f"cannot {action} {checkpoint.path}: {e}") from None


def read_twin_checkpoint(path: Path, step: Optional[int], action: str) -> CheckpointModel:
    """read_checkpoint's checkpoint, whose model has an exact Hugging Face twin."""
    checkpoint = read_checkpoint(path, step, action)
    check_twin(checkpoint, action)
    return checkpoint
