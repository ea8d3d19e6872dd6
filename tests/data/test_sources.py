"""Point 1: text directories, JSON Lines and Parquet, each file a shard, all read through `datasets`."""

import pyarrow
import pyarrow.parquet

from data_pipeline import EOD, build_dataloader

from .corpora import doc_length, id_config, token_counts, write_id_corpus


def test_text_jsonl_and_parquet_sources_deliver_every_document_once_per_epoch(tmp_path, id_tokenizer):
    words = write_id_corpus(tmp_path / "jsonl", num_shards=2, docs_per_shard=5)
    (tmp_path / "text" / "nested").mkdir(parents=True)
    for i in range(100, 104):  # a text file is one document
        (tmp_path / "text" / ("nested" if i % 2 else "") / f"{i}.txt").write_text(" ".join([f"d{i}"] * doc_length(i)))
        words[f"d{i}"] = doc_length(i)
    (tmp_path / "text" / ".hidden.txt").write_text("d999")  # dot-files are not data
    table = pyarrow.table({"body": [" ".join([f"d{i}"] * doc_length(i)) for i in range(200, 206)]})
    pyarrow.parquet.write_table(table, tmp_path / "docs.parquet")
    words |= {f"d{i}": doc_length(i) for i in range(200, 206)}
    sources = [
        {"path": tmp_path / "jsonl"},
        {"path": tmp_path / "text", "weight": 2},
        {"path": tmp_path / "docs.parquet", "text_field": "body"},
    ]
    cfg = id_config(tmp_path, id_tokenizer, sources=sources, epochs=2)
    loaders = [build_dataloader(cfg, micro_batch_size=2, dp_rank=r, dp_size=2, seed=0) for r in range(2)]
    counts = token_counts([batch for loader in loaders for batch in loader], id_tokenizer)
    assert {word: counts[word] for word in words} == {word: 2 * length for word, length in words.items()}
    assert counts[EOD] == 2 * len(words) and counts["d999"] == 0
