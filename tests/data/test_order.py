"""Points 3-6: packing, blending by weight, seeded shuffling and background workers."""

import json
import time

import torch
from tokenizers import Tokenizer

from data_pipeline import EOD, PAD, DataConfig, build_dataloader
from data_pipeline.work import shard_order

from .corpora import id_config, token_counts, write_id_corpus


def test_documents_are_joined_by_eod_and_cut_into_full_windows(stdlib_corpus, bpe_tokenizer):
    shard = sorted(stdlib_corpus.iterdir())[0]
    texts = [json.loads(line)["text"] for line in shard.read_text(encoding="utf-8").splitlines()]
    tokenizer = Tokenizer.from_file(str(bpe_tokenizer))
    eod = tokenizer.token_to_id(EOD)
    expected = [t for text in texts for t in tokenizer.encode(text).ids + [eod]]
    cfg = DataConfig(sources=[{"path": shard}], tokenizer=bpe_tokenizer, seq_len=100, shuffle_buffer=1, num_workers=0)
    loader = build_dataloader(cfg, micro_batch_size=4, dp_rank=0, dp_size=1, seed=0)
    stream = []
    while len(stream) < len(expected):
        batch = next(loader)
        assert batch.shape == (4, 101) and batch.dtype == torch.int64
        stream += batch.flatten().tolist()
    assert stream[: len(expected)] == expected  # every token, in order, nothing between documents but EOD
    assert tokenizer.token_to_id(PAD) not in stream


def test_realised_mix_over_10000_samples_is_within_2_percent_of_the_weights(tmp_path, id_tokenizer):
    weights = {"a": 5.0, "b": 3.0, "c": 2.0}
    owners = {}
    for i, name in enumerate(weights):
        words = write_id_corpus(tmp_path / name, num_shards=2, docs_per_shard=100, first_id=200 * i)
        owners.update(dict.fromkeys(words, name))
    sources = [{"path": tmp_path / name, "weight": weight} for name, weight in weights.items()]
    cfg = id_config(tmp_path, id_tokenizer, sources=sources, seq_len=8, num_workers=0)
    loader = build_dataloader(cfg, micro_batch_size=100, dp_rank=0, dp_size=1, seed=5)
    tokenizer = Tokenizer.from_file(str(id_tokenizer))
    windows = [row for _ in range(100) for row in next(loader).tolist()]
    assert len(windows) == 10_000
    sources_of = [{owners[w] for w in map(tokenizer.id_to_token, row) if w in owners} for row in windows]
    assert all(len(s) == 1 for s in sources_of), "a window mixes sources"
    total = sum(weights.values())
    for name, weight in weights.items():
        share = sum(name in s for s in sources_of) / len(windows)
        assert abs(share - weight / total) <= 0.02, (name, share)


def first_batches(cfg, seed, n=6):
    loader = build_dataloader(cfg, micro_batch_size=2, dp_rank=0, dp_size=1, seed=seed)
    return [next(loader) for _ in range(n)]


def test_same_seed_same_batches_other_seed_other_order_of_the_same_data(tmp_path, id_tokenizer):
    write_id_corpus(tmp_path / "corpus", num_shards=4, docs_per_shard=8)
    cfg = id_config(tmp_path / "corpus", id_tokenizer)
    first = first_batches(cfg, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, first_batches(cfg, seed=1)))
    assert not all(torch.equal(a, b) for a, b in zip(first, first_batches(cfg, seed=2)))
    one_epoch = id_config(tmp_path / "corpus", id_tokenizer, epochs=1, num_workers=0)
    whole = [list(build_dataloader(one_epoch, micro_batch_size=2, dp_rank=0, dp_size=1, seed=s)) for s in (1, 2)]
    assert token_counts(whole[0], id_tokenizer) == token_counts(whole[1], id_tokenizer)


def test_shard_order_is_a_seeded_permutation_that_changes_every_epoch():
    orders = [shard_order(seed=7, source_index=0, epoch=e, num_shards=20) for e in range(3)]
    assert all(sorted(order) == list(range(20)) for order in orders)
    assert len(set(orders)) == 3
    assert orders[0] == shard_order(seed=7, source_index=0, epoch=0, num_shards=20)
    assert orders[0] != shard_order(seed=8, source_index=0, epoch=0, num_shards=20)


def test_workers_prepare_batches_while_the_consumer_works_and_the_wait_is_measured(stdlib_corpus, bpe_tokenizer):
    cfg = DataConfig(sources=[{"path": stdlib_corpus}], tokenizer=bpe_tokenizer, seq_len=64, shuffle_buffer=16, num_workers=1)
    loader = build_dataloader(cfg, micro_batch_size=4, dp_rank=0, dp_size=1, seed=0)
    next(loader)
    startup_wait = loader.data_wait_seconds
    assert startup_wait > 0  # the first batch waits for the worker to start
    time.sleep(1.0)  # a "training step" during which the worker prefetches
    next(loader)
    next(loader)
    assert loader.data_wait_seconds - startup_wait < 0.1
