"""Point 8: a saved state resumed at another DP size consumes every document exactly once.

Each document's text is its id repeated, so counting tokens per id over every
batch of every rank before and after the stop proves it: a document read twice
shows up with twice its length, a skipped one with less.
"""

import pytest

from data_pipeline import EOD, PAD, build_dataloader
from data_pipeline.work import advance, merge

from .corpora import id_config, token_counts, write_id_corpus

STEPS_BEFORE_STOP = 4


def start(cfg, dp_size, states=None):
    loaders = [build_dataloader(cfg, micro_batch_size=2, dp_rank=r, dp_size=dp_size, seed=3) for r in range(dp_size)]
    for loader in loaders:
        if states is not None:
            loader.load_state_dict(states)
    return loaders


def train_steps(loaders, steps):
    """All ranks advance together, like a training loop."""
    return [next(loader) for _ in range(steps) for loader in loaders]


@pytest.mark.parametrize("dp_sizes", [(2, 1), (2, 4), (4, 2), (2, 4, 3)], ids=lambda sizes: "->".join(map(str, sizes)))
def test_every_document_exactly_once_across_dp_changes(tmp_path, id_tokenizer, dp_sizes):
    lengths = write_id_corpus(tmp_path / "corpus", num_shards=7, docs_per_shard=12)
    assert_exactly_once_across(dp_sizes, id_config(tmp_path / "corpus", id_tokenizer, epochs=1), lengths, id_tokenizer)


def assert_exactly_once_across(dp_sizes, cfg, lengths: dict[str, int], tokenizer) -> None:
    """Train STEPS_BEFORE_STOP steps at each DP size in turn, resuming from the last's states, then run dry at the
    last: every document's tokens are counted exactly its length, and one end-of-document each."""
    batches, states = [], None
    for dp_size in dp_sizes[:-1]:
        loaders = start(cfg, dp_size, states)
        batches += train_steps(loaders, STEPS_BEFORE_STOP)
        states = [loader.state_dict() for loader in loaders]
        cursors = [cursor for state in states for lane in state["lanes"] for cursor in lane["sources"]]
        assert any(c["buffer"] for c in cursors) and any(c["carry"] for c in cursors), "stop must catch work in flight"
    for loader in start(cfg, dp_sizes[-1], states):
        batches += list(loader)  # epochs=1: each rank runs dry
    counts = token_counts(batches, tokenizer)
    assert {word: counts[word] for word in lengths} == lengths
    assert counts[EOD] == len(lengths)
    assert set(counts) <= set(lengths) | {EOD, PAD}


def test_the_count_detects_a_resume_that_rereads(tmp_path, id_tokenizer):
    """The proof above can fail: restarting without the saved state re-reads documents."""
    lengths = write_id_corpus(tmp_path / "corpus", num_shards=3, docs_per_shard=6)
    cfg = id_config(tmp_path / "corpus", id_tokenizer, epochs=1, num_workers=0)
    batches = train_steps(start(cfg, 2), STEPS_BEFORE_STOP)
    batches += [batch for loader in start(cfg, 1) for batch in loader]
    counts = token_counts(batches, id_tokenizer)
    assert any(counts[word] > length for word, length in lengths.items())


def test_changing_only_the_worker_count_also_keeps_exactly_once(tmp_path, id_tokenizer):
    lengths = write_id_corpus(tmp_path / "corpus", num_shards=5, docs_per_shard=10)
    loaders = start(id_config(tmp_path / "corpus", id_tokenizer, epochs=1, num_workers=2), 2)
    batches = train_steps(loaders, STEPS_BEFORE_STOP)
    states = [loader.state_dict() for loader in loaders]
    resumed = start(id_config(tmp_path / "corpus", id_tokenizer, epochs=1, num_workers=0), 2, states)
    batches += [batch for loader in resumed for batch in loader]
    counts = token_counts(batches, id_tokenizer)
    assert {word: counts[word] for word in lengths} == lengths


def test_work_ranges_merge_and_advance():
    assert merge([[5, 6], [0, 2], [2, 3], [7, None], [9, 10]]) == [[0, 3], [5, 6], [7, None]]
    assert advance([[0, 3], [5, 6], [7, None]], 5) == [[5, 6], [7, None]]
    assert advance([[0, 3], [7, None]], 9) == [[9, None]]
