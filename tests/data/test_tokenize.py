"""Issue 28, point 1: `parallax tokenize` writes each document's tokens then eod, in a file megatron-core reads and
would have written byte for byte, the same bytes for any run and worker count, and nothing half-written."""

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy
import pytest
from tokenizers import Tokenizer

from data_pipeline import EOD, DataConfig, DataError
from data_pipeline.offline_tokenize import tokenize_corpus
from data_pipeline.token_files import TokenFile, read_meta
from data_pipeline.tokenizer import fingerprint
from launcher.cli import main

from .corpora import write_id_corpus, write_jsonl

FILES = (".bin", ".idx", ".meta.json")


def read_texts(source: Path) -> list[str]:
    """The non-empty documents of a .jsonl file or directory of them, in sorted file order: parsed here, not by
    the pipeline's reader, so a reader that lost, reordered or invented documents would be caught."""
    files = sorted(source.rglob("*.jsonl")) if source.is_dir() else [source]
    return [text for path in files for line in path.read_text(encoding="utf-8").splitlines()
            if (text := json.loads(line)["text"])]


def corpus_bytes(prefix: Path) -> dict[str, bytes]:
    return {suffix: Path(f"{prefix}{suffix}").read_bytes() for suffix in FILES}


def documents(corpus: TokenFile) -> list[list[int]]:
    starts, stops = corpus.document_spans(0, corpus.documents)
    return [corpus.tokens[start:stop].tolist() for start, stop in zip(starts, stops)]


@pytest.fixture(scope="module")
def two_sources(stdlib_corpus, tmp_path_factory) -> list[Path]:
    """The stdlib shards, then a second source whose empty document must be skipped."""
    extra = write_jsonl(tmp_path_factory.mktemp("extra") / "extra.jsonl", ["second source", "", "its last document"])
    return [stdlib_corpus, extra]


@pytest.fixture(scope="module")
def tokenized(two_sources, bpe_tokenizer, tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("tokenized") / "corpus"
    tokenize_corpus(two_sources, prefix, DataConfig(tokenizer=bpe_tokenizer), workers=2)
    return prefix


def test_corpus_is_each_document_then_eod(tokenized, two_sources, bpe_tokenizer):
    tokenizer = Tokenizer.from_file(str(bpe_tokenizer))
    eod = tokenizer.token_to_id(EOD)
    expected = [tokenizer.encode(text).ids + [eod] for source in two_sources for text in read_texts(source)]
    corpus = TokenFile(tokenized)
    assert corpus.dtype == numpy.uint16  # a 1,000-token vocabulary fits
    assert documents(corpus) == expected
    meta = read_meta(tokenized)
    assert (meta.documents, meta.tokens) == (len(expected), sum(map(len, expected)))
    assert meta.largest_id == max(max(document) for document in expected)
    assert meta.tokenizer_fingerprint == fingerprint(tokenizer.to_str())


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # megatron-core's, on numpy 2
def test_megatron_core_reads_it_and_writes_the_same_bytes(tokenized, tmp_path):
    torch = pytest.importorskip("torch")
    indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    ours = documents(TokenFile(tokenized))
    theirs = indexed_dataset.IndexedDataset(str(tokenized))
    assert len(theirs) == len(ours)
    assert [theirs[i].tolist() for i in range(len(theirs))] == ours
    builder = indexed_dataset.IndexedDatasetBuilder(str(tmp_path / "megatron.bin"), dtype=numpy.uint16)
    for document in ours:
        builder.add_document(torch.tensor(document), [len(document)])
    builder.finalize(str(tmp_path / "megatron.idx"))
    assert (tmp_path / "megatron.bin").read_bytes() == Path(f"{tokenized}.bin").read_bytes()
    assert (tmp_path / "megatron.idx").read_bytes() == Path(f"{tokenized}.idx").read_bytes()


def test_every_run_and_worker_count_writes_the_same_bytes(tokenized, two_sources, bpe_tokenizer, tmp_path):
    cfg = DataConfig(tokenizer=bpe_tokenizer)
    for run in ("first", "second"):
        tokenize_corpus(two_sources, tmp_path / run, cfg, workers=1)
        assert corpus_bytes(tmp_path / run) == corpus_bytes(tokenized)  # written with 2 workers


@pytest.fixture
def broken_source(tmp_path) -> Path:
    """Five shards, the third malformed JSON at its second line: the run fails after two shards are done."""
    write_id_corpus(tmp_path / "source", num_shards=5, docs_per_shard=4)
    third = tmp_path / "source" / "part-002.jsonl"
    lines = third.read_text(encoding="utf-8").splitlines()
    third.write_text("\n".join([lines[0], "{not json", *lines[2:]]) + "\n", encoding="utf-8")
    return third


def tree(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() if path.is_file() else b""
            for path in directory.rglob("*")}


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("earlier_corpus", [False, True])
def test_a_failed_run_leaves_no_new_corpus_and_no_temporary_files(broken_source, id_tokenizer, tmp_path, workers,
                                                                  earlier_corpus):
    """Policy: a failure removes only what the failed run wrote; a finished corpus already at PREFIX stays whole,
    since no new file replaces any of its three until the new corpus is complete."""
    cfg, prefix = DataConfig(tokenizer=id_tokenizer), tmp_path / "out" / "corpus"
    if earlier_corpus:
        good = write_id_corpus(tmp_path / "good", num_shards=2, docs_per_shard=3)
        tokenize_corpus([tmp_path / "good"], prefix, cfg, workers=1)
        assert read_meta(prefix).documents == len(good)
    before = tree(tmp_path / "out") if earlier_corpus else {}
    with pytest.raises(DataError, match=f"{broken_source}: line 2 is malformed JSON"):
        tokenize_corpus([broken_source.parent], prefix, cfg, workers=workers)
    assert tree(tmp_path / "out") == before


@pytest.mark.parametrize("idle_workers", [False, True])
def test_ctrl_c_stops_the_workers_and_leaves_nothing(broken_source, id_tokenizer, tmp_path, idle_workers):
    """With idle workers, the interruption comes after every shard is handed out and the other worker waits for
    more; without, while it still tokenizes. Either way the run ends at once, its workers gone (a CI run hung in
    this test when multiprocessing.Pool's terminate stopped them)."""
    broken_source.unlink()  # every shard is good: only the interruption stops the run

    def interrupt(report):
        if idle_workers:
            time.sleep(1.0)
        raise KeyboardInterrupt

    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus([broken_source.parent], tmp_path / "out" / "corpus", DataConfig(tokenizer=id_tokenizer),
                        workers=2, progress=interrupt)
    assert time.perf_counter() - started < 30
    assert multiprocessing.active_children() == [], "the workers are stopped before tokenize_corpus returns"
    assert tree(tmp_path / "out") == {}


def test_a_worker_killed_midway_is_one_line_naming_its_shard_and_leaves_nothing(id_tokenizer, tmp_path):
    """As the kernel's OOM killer would: every worker gets SIGKILL after the first shard, with six still to hand
    out, so the parent must notice at its next word with a worker, not wait for an answer for ever."""
    write_id_corpus(tmp_path / "source", num_shards=8, docs_per_shard=4)

    def kill_the_workers(report):
        for worker in multiprocessing.active_children():
            os.kill(worker.pid, signal.SIGKILL)

    with pytest.raises(DataError, match=r"part-00\d\.jsonl: the tokenize worker reading it died \(exit code -9\)"):
        tokenize_corpus([tmp_path / "source"], tmp_path / "out" / "corpus", DataConfig(tokenizer=id_tokenizer),
                        workers=2, progress=kill_the_workers)
    assert tree(tmp_path / "out") == {}
    assert multiprocessing.active_children() == []


def test_cli_prints_one_line_naming_the_bad_file_and_exits_2(broken_source, id_tokenizer, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["tokenize", str(broken_source.parent), "--out", str(tmp_path / "out" / "corpus"), "--workers", "1",
              "--tokenizer", str(id_tokenizer)])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    progress, error = captured.err.splitlines()[-2:]
    assert progress.endswith("2/5 shards")  # the two shards before the bad one, then the error on a line of its own
    assert error.startswith(f"parallax: error: {broken_source}: line 2 is malformed JSON")
    assert "Traceback" not in captured.err and captured.out == ""
    assert tree(tmp_path / "out") == {}


def test_cli_writes_the_corpus_and_says_so(stdlib_corpus, bpe_tokenizer, tmp_path, capsys):
    main(["tokenize", str(stdlib_corpus), "--out", str(tmp_path / "corpus"), "--tokenizer", str(bpe_tokenizer),
          "--eod-token", EOD])
    meta = read_meta(tmp_path / "corpus")
    summary = capsys.readouterr().out.strip()
    assert summary.startswith(f"parallax: wrote {tmp_path / 'corpus'}.bin/.idx: {meta.documents:,} documents, "
                              f"{meta.tokens:,} tokens (uint16), ")
    assert summary.endswith("workers")
    assert meta.documents == len(read_texts(stdlib_corpus))
