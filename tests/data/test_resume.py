"""Point 7: resuming from state_dict() yields exactly the batches of the uninterrupted run."""

import io

import pytest
import torch

from data_pipeline import DataConfig, DataError, build_dataloader

from .corpora import id_config, token_counts, write_id_corpus

STOP_AFTER, COMPARE = 7, 40  # 40 more steps cross epoch boundaries on these small corpora


def run_and_resume(cfg, dp_size):
    """Returns (batches of the uninterrupted run after the stop, batches of the resumed run)."""
    def loaders():
        return [build_dataloader(cfg, micro_batch_size=2, dp_rank=r, dp_size=dp_size, seed=11) for r in range(dp_size)]

    original = loaders()
    for _ in range(STOP_AFTER):
        for loader in original:
            next(loader)
    states = through_a_checkpoint_file([loader.state_dict() for loader in original])
    expected = [[next(loader) for _ in range(COMPARE)] for loader in original]
    resumed = loaders()
    for loader in resumed:
        loader.load_state_dict(states)
    return expected, [[next(loader) for _ in range(COMPARE)] for loader in resumed]


def through_a_checkpoint_file(states):
    """Checkpoints are loaded with torch.load(weights_only=True), which accepts only plain data."""
    file = io.BytesIO()
    torch.save(states, file)
    file.seek(0)
    return torch.load(file, weights_only=True)


def assert_bitwise_equal(expected, actual):
    assert len(expected) == len(actual)
    for rank_expected, rank_actual in zip(expected, actual):
        for step, (a, b) in enumerate(zip(rank_expected, rank_actual)):
            assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b), f"batch {step} differs after resume"


@pytest.mark.parametrize("dp_size", [1, 2])
def test_exact_resume_with_workers(tmp_path, id_tokenizer, dp_size):
    write_id_corpus(tmp_path / "corpus", num_shards=5, docs_per_shard=10)
    assert_bitwise_equal(*run_and_resume(id_config(tmp_path / "corpus", id_tokenizer, num_workers=2), dp_size))


def test_exact_resume_on_real_text_with_blending(stdlib_corpus, bpe_tokenizer, tmp_path):
    """Two weighted sources of real text through a trained BPE: blend counters and both packers resume too."""
    shards = sorted(stdlib_corpus.iterdir())
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for i, shard in enumerate(shards):
        (tmp_path / "ab"[i % 2] / shard.name).symlink_to(shard)
    cfg = DataConfig(
        sources=[{"path": tmp_path / "a", "weight": 3}, {"path": tmp_path / "b", "weight": 1}],
        tokenizer=bpe_tokenizer, seq_len=64, shuffle_buffer=4, num_workers=2,
    )
    assert_bitwise_equal(*run_and_resume(cfg, dp_size=2))


def test_a_fresh_loader_does_not_continue_where_the_old_one_stopped(tmp_path, id_tokenizer):
    """The resume comparison can fail: without load_state_dict the batches differ."""
    write_id_corpus(tmp_path / "corpus", num_shards=5, docs_per_shard=10)
    cfg = id_config(tmp_path / "corpus", id_tokenizer, num_workers=0)
    original = build_dataloader(cfg, micro_batch_size=2, dp_rank=0, dp_size=1, seed=11)
    for _ in range(STOP_AFTER):
        next(original)
    fresh = build_dataloader(cfg, micro_batch_size=2, dp_rank=0, dp_size=1, seed=11)
    assert not all(torch.equal(next(original), next(fresh)) for _ in range(5))


@pytest.mark.parametrize("change", ["seed", "files", "tokenizer", "rank order"])
def test_resuming_onto_different_data_is_refused(tmp_path, id_tokenizer, bpe_tokenizer, change):
    write_id_corpus(tmp_path / "corpus", num_shards=3, docs_per_shard=4)
    cfg = id_config(tmp_path / "corpus", id_tokenizer, num_workers=0)
    states = [build_dataloader(cfg, micro_batch_size=2, dp_rank=r, dp_size=2, seed=11).state_dict() for r in range(2)]
    seed = 12 if change == "seed" else 11
    if change == "files":
        write_id_corpus(tmp_path / "corpus", num_shards=4, docs_per_shard=4)
    if change == "tokenizer":
        cfg = id_config(tmp_path / "corpus", bpe_tokenizer, num_workers=0)
    if change == "rank order":
        states.reverse()
    with pytest.raises(DataError, match=change.split()[-1]):
        build_dataloader(cfg, micro_batch_size=2, dp_rank=0, dp_size=1, seed=seed).load_state_dict(states)



@pytest.mark.parametrize("dp_size", [1, 2], ids=["same layout", "resharded"])
def test_a_state_saved_before_windows_knew_their_epoch_still_resumes(tmp_path, id_tokenizer, dp_size):
    """Checkpoints written before the carry kept its tokens' epochs have no `carry_epochs`: they still
    resume, at the same layout exactly and at another with every document once."""
    lengths = write_id_corpus(tmp_path / "corpus", num_shards=5, docs_per_shard=10)
    cfg = id_config(tmp_path / "corpus", id_tokenizer, num_workers=0, epochs=1)
    original = build_dataloader(cfg, micro_batch_size=2, dp_rank=0, dp_size=1, seed=11)
    head = [next(original) for _ in range(STOP_AFTER)]
    state = original.state_dict()
    cursors = [cursor for lane in state["lanes"] for cursor in lane["sources"]]
    assert any(cursor["carry"] for cursor in cursors), "the stop must catch carried tokens"
    for cursor in cursors:
        del cursor["carry_epochs"]
    resumed = [build_dataloader(cfg, micro_batch_size=2, dp_rank=r, dp_size=dp_size, seed=11) for r in range(dp_size)]
    for loader in resumed:
        loader.load_state_dict(through_a_checkpoint_file([state]))
    if dp_size == 1:
        assert_bitwise_equal([list(original)], [list(resumed[0])])
    else:
        counts = token_counts(head + [batch for loader in resumed for batch in loader], id_tokenizer)
        assert {word: counts[word] for word in lengths} == lengths
