"""Session-wide real tokenizers and corpora for the data pipeline tests."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from data_pipeline import EOD, PAD, prepare_data, prepare_tokenizer

ID_VOCAB = 2000


@pytest.fixture(scope="session")
def id_tokenizer(tmp_path_factory) -> Path:
    """A word-level tokenizer.json in which each document id word is a single token."""
    vocab = {EOD: 0, PAD: 1, "<unk>": 2} | {f"d{i}": i + 3 for i in range(ID_VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("id_tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory) -> Path:
    """A small slice of the built-in corpus: real text, quick to tokenize."""
    out = tmp_path_factory.mktemp("stdlib")
    prepare_data(out, max_bytes=300_000, num_shards=6)
    return out


@pytest.fixture(scope="session")
def bpe_tokenizer(stdlib_corpus, tmp_path_factory) -> Path:
    return prepare_tokenizer([stdlib_corpus], tmp_path_factory.mktemp("bpe") / "tokenizer.json", vocab_size=1000)

