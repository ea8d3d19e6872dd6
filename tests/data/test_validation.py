"""Issue 15 point 1: the validation set, held out of the training sources or given apart.

With no data.validation, a hash of each document's identity (file name, record index) holds out
data.validation_fraction of the documents: training never reads them, evaluation reads only them,
and the evaluated windows are the same whatever the DP size.
"""
import pytest
import torch

from data_pipeline import DataError, build_dataloader
from data_pipeline.validation import validation_batches
from data_pipeline.work import held_out

from .corpora import id_config, token_counts, write_id_corpus

SHARDS, DOCS = 6, 20


def held_out_words(fraction: float) -> set[str]:
    return {f"d{shard * DOCS + i}" for shard in range(SHARDS) for i in range(DOCS)
            if held_out(f"part-{shard:03d}.jsonl", i, fraction)}


def windows(cfg, dp_size: int, batches: int = 100) -> list[torch.Tensor]:
    """Every rank's validation micro-batches, back in the global order: rank r holds rows r*m..(r+1)*m."""
    per_rank = [validation_batches(cfg, batches=batches, micro_batch_size=4 // dp_size, grad_accum=1, dp_rank=r,
                                   dp_size=dp_size, seed=3) for r in range(dp_size)]
    return [torch.cat([rank[i] for rank in per_rank]) for i in range(len(per_rank[0]))]


def test_training_never_reads_a_held_out_document_and_evaluation_reads_only_them(tmp_path, id_tokenizer):
    lengths = write_id_corpus(tmp_path / "corpus", SHARDS, DOCS)
    cfg = id_config(tmp_path / "corpus", id_tokenizer, epochs=1, validation_fraction=0.25)
    held = held_out_words(0.25)
    assert 0 < len(held) < len(lengths)

    trained = token_counts([b for r in range(2) for b in build_dataloader(
        cfg, micro_batch_size=2, dp_rank=r, dp_size=2, seed=3)], id_tokenizer)
    assert {word: trained[word] for word in lengths if word not in held} == {
        word: length for word, length in lengths.items() if word not in held}  # every other document, once
    assert not held & set(trained)

    evaluated = token_counts(windows(cfg, dp_size=1), id_tokenizer)
    assert set(evaluated) - {"<|endoftext|>"} <= held
    assert sum(evaluated[word] for word in held) > 0.5 * sum(lengths[word] for word in held)


def test_the_evaluated_windows_do_not_depend_on_the_dp_size(tmp_path, id_tokenizer):
    write_id_corpus(tmp_path / "corpus", SHARDS, DOCS)
    cfg = id_config(tmp_path / "corpus", id_tokenizer, validation_fraction=0.25)
    one, two = windows(cfg, dp_size=1), windows(cfg, dp_size=2)
    assert len(one) == len(two) > 1
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_data_validation_is_read_instead_of_a_held_out_part(tmp_path, id_tokenizer):
    write_id_corpus(tmp_path / "corpus", SHARDS, DOCS)
    lengths = write_id_corpus(tmp_path / "valid", 1, DOCS, first_id=SHARDS * DOCS)
    cfg = id_config(tmp_path / "corpus", id_tokenizer, validation=[{"path": tmp_path / "valid"}])
    evaluated = token_counts(windows(cfg, dp_size=2), id_tokenizer)
    assert set(evaluated) - {"<|endoftext|>"} <= set(lengths)


@pytest.mark.parametrize("problem,expected", [
    ("missing", "data.validation[].path"),
    ("empty", "no non-empty data files found; point data.validation[].path"),
    ("too small", "fewer than one batch of 2 x 1 for each of the 2 DP rank(s)"),
    ("none held out", "evaluation needs held-out data: set data.validation, or data.validation_fraction above 0"),
])
def test_bad_validation_data_is_one_line_naming_it(tmp_path, id_tokenizer, problem, expected):
    write_id_corpus(tmp_path / "corpus", SHARDS, DOCS)
    (tmp_path / "empty").mkdir()
    write_id_corpus(tmp_path / "tiny", 1, 1, first_id=SHARDS * DOCS)
    fields = {"missing": {"validation": [{"path": tmp_path / "nope"}]},
              "empty": {"validation": [{"path": tmp_path / "empty"}]},
              "too small": {"validation": [{"path": tmp_path / "tiny"}]},
              "none held out": {"validation_fraction": 0.0}}[problem]
    cfg = id_config(tmp_path / "corpus", id_tokenizer, **fields)
    with pytest.raises(DataError) as error:
        validation_batches(cfg, batches=2, micro_batch_size=2, grad_accum=1, dp_rank=0, dp_size=2, seed=3)
    assert expected in str(error.value) and "\n" not in str(error.value)
