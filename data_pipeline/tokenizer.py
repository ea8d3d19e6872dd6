"""Byte-level BPE tokenizers: training one locally and loading any tokenizer.json.

Byte-level means every UTF-8 text is encodable with no unknown token, which is
what a pretraining corpus of arbitrary files needs.
"""

import hashlib
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .cache import build_once
from .config import EOD, MASK, NUM_SENTINELS, PAD, DataConfig, SourceConfig
from .corpus import builtin_corpus
from .errors import DataError
from .sources import discover, read_documents

# The mask comes last so that end-of-document, pad and the sentinels keep the ids they had before it was added.
SPECIAL_TOKENS = [EOD, PAD] + [f"<extra_id_{i}>" for i in range(NUM_SENTINELS)] + [MASK]
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens


def prepare_tokenizer(sources: Iterable[str | Path | SourceConfig], out_path: str | Path, vocab_size: int = 8192) -> Path:
    """Trains a byte-level BPE on every document of `sources` and saves it as `out_path` (tokenizer.json)."""
    if vocab_size <= MIN_VOCAB:
        raise DataError(f"vocab_size {vocab_size} is too small: bytes and special tokens alone take {MIN_VOCAB}; use at least 512")
    configs = [s if isinstance(s, SourceConfig) else SourceConfig(path=Path(s)) for s in sources]
    if not configs:
        raise DataError("prepare-tokenizer needs at least one source path to train on")
    shards = [shard for cfg in configs for shard in discover(cfg).shards]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((text for shard in shards for _, text in read_documents(shard)), trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_path))
    return out_path


def tokenizer_path(cfg: DataConfig) -> Path:
    """The configured tokenizer.json, or the built-in one (trained on the built-in corpus once, then cached)."""
    return cfg.tokenizer.expanduser() if cfg.tokenizer else builtin_tokenizer_path(cfg)


def load_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The tokenizer at `tokenizer_path`. Refused unless it has data.eod_token and data.pad_token, which the
    pipeline inserts by name."""
    path = tokenizer_path(cfg)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file not found; fix data.tokenizer or run `parallax prepare-tokenizer`")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises a bare Exception for any parse failure
        raise DataError(f"{path}: not a valid tokenizer.json ({' '.join(str(error).split())})") from None
    missing = [f"data.{field}={token}" for field, token in (("eod_token", cfg.eod_token), ("pad_token", cfg.pad_token))
               if tokenizer.token_to_id(token) is None]
    if missing:
        raise DataError(f"{path}: tokenizer lacks the special token(s) {', '.join(missing)}; set each field to a token "
                        "it has (its end-of-text token, which may pad too), or train one with `parallax prepare-tokenizer`")
    return tokenizer


def fingerprint(tokenizer_json: str) -> str:
    """Names a tokenizer by its whole content (`Tokenizer.to_str()`): checkpoints and tokenized corpora record it,
    so that tokens are never read with a tokenizer other than the one that made them."""
    return hashlib.sha256(tokenizer_json.encode()).hexdigest()[:16]


def builtin_tokenizer_path(cfg: DataConfig) -> Path:
    """Named by its special tokens too, so a tokenizer cached before a special token was added is not taken for one
    that has it."""
    corpus = builtin_corpus(cfg.cache_dir)
    specials = hashlib.blake2b("\n".join(SPECIAL_TOKENS).encode(), digest_size=4).hexdigest()
    name = f"tokenizer-{corpus.path.name}-vocab{cfg.vocab_size}-special{specials}.json"
    return build_once(cfg.cache_dir / name, lambda tmp: prepare_tokenizer([corpus], tmp, cfg.vocab_size))
