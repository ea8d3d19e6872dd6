"""Session-wide real tokenizers and corpora for the data pipeline tests."""

from pathlib import Path

import pytest

from data_pipeline import prepare_data, prepare_tokenizer

from .corpora import write_id_tokenizer

ID_VOCAB = 2000


@pytest.fixture(scope="session")
def id_tokenizer(tmp_path_factory) -> Path:
    return write_id_tokenizer(tmp_path_factory.mktemp("id_tokenizer") / "tokenizer.json", ID_VOCAB)


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory) -> Path:
    """A small slice of the built-in corpus: real text, quick to tokenize."""
    out = tmp_path_factory.mktemp("stdlib")
    prepare_data(out, max_bytes=300_000, num_shards=6)
    return out


@pytest.fixture(scope="session")
def bpe_tokenizer(stdlib_corpus, tmp_path_factory) -> Path:
    return prepare_tokenizer([stdlib_corpus], tmp_path_factory.mktemp("bpe") / "tokenizer.json", vocab_size=1000)

