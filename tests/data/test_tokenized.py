"""Issue 28 point 2: a tokenized corpus (.bin/.idx) keeps every guarantee of the streaming pipeline."""

import time

import numpy
import pytest
import torch
from tokenizers import Tokenizer

from data_pipeline import EOD, DataError, build_dataloader
from data_pipeline.validation import validation_batches
from data_pipeline.work import held_out

from .corpora import id_config, token_counts, tokenized_copy, write_id_corpus
from .test_reshard import assert_exactly_once_across
from .test_resume import assert_bitwise_equal, run_and_resume

def tokenized_config(tmp_path, tokenizer, num_shards=7, docs_per_shard=12, **overrides):
    """The id corpus, tokenized; returns (config reading the pair, {word: length})."""
    lengths = write_id_corpus(tmp_path / "text", num_shards, docs_per_shard)
    source = tokenized_copy(tmp_path / "text", tmp_path / "corpus", tokenizer)
    return id_config(tmp_path, tokenizer, sources=[source], **overrides), lengths


@pytest.mark.parametrize("dp_sizes", [(2, 1), (2, 4, 3)], ids=lambda sizes: "->".join(map(str, sizes)))
def test_every_document_exactly_once_across_dp_changes(tmp_path, id_tokenizer, dp_sizes):
    cfg, lengths = tokenized_config(tmp_path, id_tokenizer, epochs=1)
    assert_exactly_once_across(dp_sizes, cfg, lengths, id_tokenizer)


def test_exact_resume_with_workers_mixed_with_a_text_source(tmp_path, id_tokenizer):
    cfg, _ = tokenized_config(tmp_path, id_tokenizer, num_workers=2)
    write_id_corpus(tmp_path / "more", num_shards=3, docs_per_shard=10, first_id=500)
    cfg = cfg.model_copy(update={"sources": [*cfg.sources, cfg.sources[0].model_copy(
        update={"path": tmp_path / "more", "format": None, "weight": 0.5})]})
    assert_bitwise_equal(*run_and_resume(cfg, dp_size=2))


def test_the_held_out_documents_are_chosen_by_identity_and_training_never_reads_them(tmp_path, id_tokenizer):
    cfg, lengths = tokenized_config(tmp_path, id_tokenizer, epochs=1, validation_fraction=0.25)
    held = {f"d{i}" for i in range(len(lengths)) if held_out("corpus", i, 0.25)}
    assert 0 < len(held) < len(lengths)
    trained = token_counts([batch for rank in range(2) for batch in build_dataloader(
        cfg, micro_batch_size=2, dp_rank=rank, dp_size=2, seed=3)], id_tokenizer)
    assert {word: trained[word] for word in lengths if word not in held} == {
        word: length for word, length in lengths.items() if word not in held}
    assert not held & set(trained)
    one, two = ([torch.cat(rows) for rows in zip(*[validation_batches(
        cfg, batches=100, micro_batch_size=4 // dp, grad_accum=1, dp_rank=r, dp_size=dp, seed=3) for r in range(dp)])]
        for dp in (1, 2))
    assert len(one) == len(two) > 1 and all(torch.equal(a, b) for a, b in zip(one, two))
    assert set(token_counts(one, id_tokenizer)) - {EOD} <= held


def test_the_shuffle_is_seeded(tmp_path, id_tokenizer):
    cfg, _ = tokenized_config(tmp_path, id_tokenizer, num_workers=0)

    def first(seed):
        loader = build_dataloader(cfg, micro_batch_size=2, dp_rank=0, dp_size=1, seed=seed)
        return torch.cat([next(loader) for _ in range(6)])

    assert torch.equal(first(1), first(1)) and not torch.equal(first(1), first(2))


def test_a_corpus_from_megatrons_preprocessing_trains_as_it_is(tmp_path, id_tokenizer):
    """Written by megatron-core's own builder with no end-of-document tokens and no .meta.json: the pipeline adds
    each document's end-of-document, and reads it once the user vouches for the tokenizer."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    lengths = write_id_corpus(tmp_path / "text", num_shards=3, docs_per_shard=10)
    tokenizer = Tokenizer.from_file(str(id_tokenizer))
    builder = IndexedDatasetBuilder(str(tmp_path / "megatron.bin"), dtype=numpy.uint16)
    for word, length in lengths.items():
        builder.add_document(torch.tensor([tokenizer.token_to_id(word)] * length), [length])
    builder.finalize(str(tmp_path / "megatron.idx"))
    source = {"path": tmp_path / "megatron", "format": "tokenized"}
    with pytest.raises(DataError, match="megatron.meta.json: missing, so nothing says which tokenizer made"):
        build_dataloader(id_config(tmp_path, id_tokenizer, sources=[source]), micro_batch_size=2, dp_rank=0,
                         dp_size=1, seed=0)
    cfg = id_config(tmp_path, id_tokenizer, sources=[source], epochs=1, tokenizer_check=False)
    counts = token_counts(list(build_dataloader(cfg, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)), id_tokenizer)
    assert {word: counts[word] for word in lengths} == lengths and counts[EOD] == len(lengths)


def test_masked_lm_and_span_corruption_read_tokenized_corpora(tmp_path, stdlib_corpus, bpe_tokenizer):
    source = tokenized_copy(stdlib_corpus, tmp_path / "corpus", bpe_tokenizer)
    tokenizer = Tokenizer.from_file(str(bpe_tokenizer))
    corpus_ids = set(numpy.fromfile(tmp_path / "corpus.bin", dtype=numpy.uint16).tolist())
    for objective in ({"masked_lm": {}}, {"span_corruption": {}}):
        cfg = id_config(tmp_path, bpe_tokenizer, sources=[source], seq_len=64, **objective)
        batch = next(build_dataloader(cfg, micro_batch_size=4, dp_rank=0, dp_size=1, seed=0))
        labels = batch["labels"][batch["labels"] >= 0].tolist()
        assert batch["input_ids"].shape == (4, 64) and labels
        special = {tokenizer.token_to_id(f"<extra_id_{k}>") for k in range(100)} | {tokenizer.token_to_id(EOD)}
        assert set(labels) - special <= corpus_ids, objective


def write_corpus(prefix, documents, dtype=numpy.uint16, fingerprint_of=None):
    from data_pipeline.token_files import TokenFileWriter
    from data_pipeline.tokenizer import fingerprint

    writer = TokenFileWriter(prefix, dtype)
    for document in documents:
        writer.add_document(numpy.array(document))
    writer.finish(fingerprint(Tokenizer.from_file(str(fingerprint_of)).to_str()) if fingerprint_of else "none")
    return {"path": prefix, "format": "tokenized"}


@pytest.mark.parametrize("problem,expected", [
    ("no .idx", "corpus.idx: missing; a tokenized source needs both PREFIX.bin and PREFIX.idx"),
    ("no .bin", "corpus.bin: missing; a tokenized source needs both PREFIX.bin and PREFIX.idx"),
    ("short .bin", "corpus.bin: 58 bytes, shorter than the 60 its index corpus.idx says; the copy is incomplete"),
    ("not an index", "corpus.idx: not a Megatron token index (no MMIDIDX header)"),
    ("uint8 ids", "corpus.idx: stores uint8 ids, up to 255, but the tokenizer has 2003 tokens; tokenize it again"),
    ("other tokenizer", "corpus.bin: tokenized with tokenizer "),
])
def test_bad_tokenized_corpora_are_refused_at_start_in_one_line_naming_the_file(tmp_path, id_tokenizer, problem,
                                                                                    expected):
    prefix = tmp_path / "corpus"
    documents = [[5 + i] * 10 for i in range(3)]
    if problem == "uint8 ids":
        source = write_corpus(prefix, documents, numpy.uint8, fingerprint_of=id_tokenizer)
    elif problem == "other tokenizer":
        from .corpora import write_id_tokenizer

        source = write_corpus(prefix, documents, fingerprint_of=write_id_tokenizer(tmp_path / "other.json", 2001))
    else:
        source = write_corpus(prefix, documents, fingerprint_of=id_tokenizer)
    if problem == "no .idx":
        (tmp_path / "corpus.idx").unlink()
    elif problem == "no .bin":
        (tmp_path / "corpus.bin").unlink()
    elif problem == "short .bin":
        (tmp_path / "corpus.bin").write_bytes((tmp_path / "corpus.bin").read_bytes()[:-2])
    elif problem == "not an index":
        (tmp_path / "corpus.idx").write_bytes(b"{}")
    with pytest.raises(DataError) as error:
        build_dataloader(id_config(tmp_path, id_tokenizer, sources=[source]), micro_batch_size=2, dp_rank=0,
                         dp_size=1, seed=0)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_ids_beyond_the_models_vocabulary_are_refused_before_the_model_is_built(tmp_path, id_tokenizer):
    """A corpus made with a larger tokenizer (trusted with tokenizer_check: false) would fail at the first batch
    holding such an id, maybe step 1000: the ranks check every corpus's largest id at start."""
    from launcher.config import ConfigError, load_config

    write_corpus(tmp_path / "corpus", [[7] * 10, [4999, 3]])
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  tokenizer: {id_tokenizer}\n  tokenizer_check: false\n  sources:\n"
                      f"    - path: {tmp_path / 'corpus'}\n      format: tokenized\n", encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_config(config, ["model.vocab_size=2048"]).check_vocab_size()
    assert str(error.value) == (f"{tmp_path / 'corpus'}.bin: holds token id 4999, beyond the model's 2048-token "
                                "vocabulary; set model.vocab_size to 5000 or more, or tokenize the corpus with "
                                "data.tokenizer")
    assert load_config(config, ["model.vocab_size=5000"]).check_vocab_size() == 5000


def test_a_billion_token_corpus_starts_as_fast_as_a_million_token_one(tmp_path, id_tokenizer):
    """Point 3: start-up maps the index and reads only the first batch's documents. The .bin is sparse (its zeros
    take no disk); a scan of its 2 GB, for the largest id say, takes seconds (4 s measured here)."""
    from data_pipeline.token_files import CorpusMeta, bin_path, idx_path, meta_path, write_index
    from data_pipeline.tokenizer import fingerprint

    own = fingerprint(Tokenizer.from_file(str(id_tokenizer)).to_str())

    def seconds_to_the_first_batch(tokens: int) -> float:
        prefix = tmp_path / f"corpus-{tokens}"
        lengths = numpy.full(tokens // 100_000, 100_000)
        write_index(idx_path(prefix), numpy.uint16, lengths)
        with open(bin_path(prefix), "wb") as data:
            data.truncate(2 * tokens)
        meta_path(prefix).write_text(CorpusMeta(own, len(lengths), tokens, 0).to_json(), encoding="utf-8")
        cfg = id_config(tmp_path, id_tokenizer, sources=[{"path": prefix, "format": "tokenized"}], seq_len=2048,
                        num_workers=0)
        start = time.perf_counter()
        next(build_dataloader(cfg, micro_batch_size=8, dp_rank=0, dp_size=1, seed=0))
        return time.perf_counter() - start

    seconds_to_the_first_batch(1_000_000)  # first-use costs (imports, caches) are paid once, before timing
    small, large = seconds_to_the_first_batch(1_000_000), seconds_to_the_first_batch(1_000_000_000)
    assert large < 2 * small + 0.5, (small, large)


def test_the_memory_task_draws_its_filler_from_a_tokenized_corpus(tmp_path, stdlib_corpus):
    """data.fact_task (recurrent memory's task) reads its filler through the same lanes: from a tokenized corpus
    too, the training documents' tokens for training and the held-out documents' for evaluation."""
    from data_pipeline import DataConfig
    from data_pipeline.config import FactTaskConfig
    from data_pipeline.fact_task import FactTask
    from data_pipeline.tokenizer import tokenizer_path

    builtin = tokenizer_path(DataConfig())
    source = tokenized_copy(stdlib_corpus, tmp_path / "corpus", builtin)
    cfg = DataConfig(fact_task=FactTaskConfig(), sources=[source], tokenizer=builtin)
    corpus = numpy.fromfile(tmp_path / "corpus.bin", dtype=numpy.uint16)
    train, held = (FactTask.build(cfg, 32, seed=7, held_out=held_out).filler for held_out in (False, True))
    assert len(train) > len(held) > 1000
    padding = {Tokenizer.from_file(str(builtin)).token_to_id(cfg.pad_token)}  # this small corpus runs out: padded
    assert set(train.tolist()) | set(held.tolist()) <= set(corpus.tolist()) | padding
    starts = numpy.flatnonzero(corpus == held[0])
    assert not any(numpy.array_equal(train[i:i + 16], held[:16]) for i in range(len(train) - 16)), \
        "evaluation filler must come from held-out documents"
    assert any(numpy.array_equal(corpus[i:i + 16], held[:16]) for i in starts)


def test_tokenize_then_train_on_the_corpus_blended_with_text(tmp_path, stdlib_corpus):
    """The user's trip, real processes: `parallax tokenize`, then 2 ranks train on the pair and on text."""
    import subprocess

    from tests.test_console import PARALLAX, REPO

    def parallax(*args):
        return subprocess.run([*PARALLAX, *args], cwd=REPO, capture_output=True, text=True, timeout=600)

    tokenized = parallax("tokenize", str(stdlib_corpus), "--out", str(tmp_path / "corpus"), "--workers", "2")
    assert tokenized.returncode == 0 and "parallax: wrote" in tokenized.stdout, tokenized.stderr[-2000:]
    trained = parallax("train", "configs/gpt-tiny.yaml", "--nproc", "2", "model.num_layers=1", "train.steps=3",
                       "train.eval_interval=0", f"logging.run_dir={tmp_path / 'run'}",
                       f"data.sources=[{{path: {tmp_path / 'corpus'}, format: tokenized}}, "
                       f"{{path: {stdlib_corpus}, weight: 0.5}}]")
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-3000:]
    assert "parallax: done: 3 steps" in trained.stdout + trained.stderr
