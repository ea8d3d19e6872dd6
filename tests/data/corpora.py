"""Real test corpora and their token accounting, written under tmp paths."""

import json
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from data_pipeline import EOD, PAD, DataConfig


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    return path


def doc_length(doc_id: int) -> int:
    """Varied lengths, some longer than a window, so documents straddle window boundaries."""
    return 1 + (doc_id * 7) % 37


def write_id_corpus(directory: Path, num_shards: int, docs_per_shard: int, first_id: int = 0) -> dict[str, int]:
    """Document i is the word `d<i>` repeated doc_length(i) times: every token names its document.

    Returns {word: length}, the token count each document must contribute per epoch.
    """
    directory.mkdir(parents=True, exist_ok=True)
    lengths = {}
    for shard in range(num_shards):
        ids = range(first_id + shard * docs_per_shard, first_id + (shard + 1) * docs_per_shard)
        write_jsonl(directory / f"part-{shard:03d}.jsonl", (" ".join([f"d{i}"] * doc_length(i)) for i in ids))
        lengths.update({f"d{i}": doc_length(i) for i in ids})
    return lengths


def write_id_tokenizer(path: Path, num_ids: int, specials: tuple[str, ...] = (EOD, PAD, "<unk>")) -> Path:
    """A word-level tokenizer.json in which each document id word `d<i>` (i < num_ids) is a single token,
    after `specials` (which must hold <unk>): Parallax's by default, ("<unk>", "<s>", "</s>") for Llama 2's."""
    vocab = {token: i for i, token in enumerate(specials)} | {f"d{i}": i + len(specials) for i in range(num_ids)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    return path


def token_counts(batches, tokenizer_path: Path) -> Counter:
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    return Counter(tokenizer.id_to_token(t) for batch in batches for t in batch.flatten().tolist())


def id_config(corpus: Path, tokenizer: Path, **overrides) -> DataConfig:
    """Every document is training data (no validation hold-out), so each one's tokens can be counted."""
    fields = dict(sources=[{"path": corpus}], tokenizer=tokenizer, seq_len=16, shuffle_buffer=8, num_workers=1,
                  validation_fraction=0.0)
    return DataConfig(**(fields | overrides))


def tokenized_copy(corpus: Path, prefix: Path, tokenizer_path: Path) -> dict:
    """`corpus` tokenized by `parallax tokenize`'s own function; returns the data.sources entry that reads it."""
    from data_pipeline.offline_tokenize import tokenize_corpus

    tokenize_corpus([corpus], prefix, DataConfig(tokenizer=tokenizer_path), workers=1)
    return {"path": prefix, "format": "tokenized"}
