"""Point 10: every kind of bad data gives one clear line naming the file, or is skipped and counted."""

import logging

import pyarrow
import pyarrow.parquet
import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer, models

from data_pipeline import DataConfig, DataError, build_dataloader, load_tokenizer, prepare_tokenizer

from .corpora import id_config, token_counts, write_id_corpus, write_jsonl


def first_batch(cfg):
    return next(build_dataloader(cfg, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0))


def error_line(cfg) -> str:
    with pytest.raises(DataError) as caught:
        first_batch(cfg)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_missing_path(tmp_path, id_tokenizer):
    assert str(tmp_path / "nope") in error_line(id_config(tmp_path / "nope", id_tokenizer))


def test_empty_files_are_skipped_and_counted(tmp_path, id_tokenizer, caplog):
    lengths = write_id_corpus(tmp_path / "corpus", num_shards=2, docs_per_shard=3)
    (tmp_path / "corpus" / "empty.jsonl").touch()
    cfg = id_config(tmp_path / "corpus", id_tokenizer, epochs=1, num_workers=0)
    with caplog.at_level(logging.WARNING):
        loader = build_dataloader(cfg, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    assert loader.plan.sources[0].skipped_empty == (tmp_path / "corpus" / "empty.jsonl",)
    assert "skipped 1 empty file" in caplog.text
    counts = token_counts(list(loader), id_tokenizer)
    assert {word: counts[word] for word in lengths} == lengths


@pytest.mark.parametrize("empty_files", [0, 2])
def test_empty_corpus(tmp_path, id_tokenizer, empty_files):
    (tmp_path / "corpus").mkdir()
    for i in range(empty_files):
        (tmp_path / "corpus" / f"{i}.txt").touch()
    assert "no non-empty data files" in error_line(id_config(tmp_path / "corpus", id_tokenizer))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_non_utf8_text_file(tmp_path, id_tokenizer, num_workers):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    message = error_line(id_config(bad, id_tokenizer, num_workers=num_workers))
    assert str(bad) in message and "UTF-8" in message


def test_non_utf8_json_line(tmp_path, id_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "d1"}\n{"text": "caf\xe9"}\n')
    message = error_line(id_config(bad, id_tokenizer))
    assert str(bad) in message and "line 2 is not UTF-8" in message


def test_malformed_json_line(tmp_path, id_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "d1"}\n{"text": "d2"}\n{"text": d3}\n', encoding="utf-8")
    message = error_line(id_config(bad, id_tokenizer))
    assert str(bad) in message and "line 3 is malformed JSON" in message


def test_json_record_without_the_text_field(tmp_path, id_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "d1"}\n{"body": "d2"}\n', encoding="utf-8")
    message = error_line(id_config(bad, id_tokenizer))
    assert str(bad) in message and "record 2" in message and "'text'" in message


def test_parquet_without_the_text_column(tmp_path, id_tokenizer):
    bad = tmp_path / "docs.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"content": ["d1 d1", "d2"]}), bad)
    message = error_line(id_config(bad, id_tokenizer))
    assert str(bad) in message and "'text'" in message and "content" in message


def test_parquet_with_the_text_column_is_read(tmp_path, id_tokenizer):
    good = tmp_path / "docs.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"body": ["d1 d1", "d2"]}), good)
    cfg = id_config(tmp_path, id_tokenizer, sources=[{"path": good, "text_field": "body"}], epochs=1)
    assert token_counts([first_batch(cfg)], id_tokenizer)["d1"] == 2


def test_source_whose_documents_are_all_empty_fails_instead_of_hanging(tmp_path, id_tokenizer):
    write_jsonl(tmp_path / "blank.jsonl", ["", ""])
    assert "every document in this source is empty" in error_line(id_config(tmp_path, id_tokenizer, num_workers=0))


def test_tokenizer_problems(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(DataError, match="tokenizer file not found"):
        load_tokenizer(DataConfig(tokenizer=missing))
    without_specials = tmp_path / "plain.json"
    Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(without_specials))
    with pytest.raises(DataError, match="lacks the special token"):
        load_tokenizer(DataConfig(tokenizer=without_specials))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(DataConfig(tokenizer=garbage))
    with pytest.raises(DataError, match="too small"):
        prepare_tokenizer([tmp_path], tmp_path / "t.json", vocab_size=300)


@pytest.mark.parametrize(
    "fields, field",
    [({"seq_len": 0}, "seq_len"), ({"vocab_size": -1}, "vocab_size"), ({"shuffle_buffer": 0}, "shuffle_buffer"),
     ({"epochs": 0}, "epochs"), ({"num_workers": -1}, "num_workers"), ({"seq_lenn": 8}, "seq_lenn"),
     ({"sources": [{"path": "x", "weight": 0}]}, "weight")],
)
def test_config_errors_name_the_field(fields, field):
    with pytest.raises(ValidationError, match=field):
        DataConfig(**fields)
