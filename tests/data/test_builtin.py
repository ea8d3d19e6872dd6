"""Point 9 and the tokenizer of point 2: the built-in corpus and tokenizer, made from the local stdlib."""

import filecmp
import json
import multiprocessing
import sysconfig
import time
from pathlib import Path

from data_pipeline import EOD, MASK, PAD, SPECIAL_TOKENS, DataConfig, build_dataloader, load_tokenizer, prepare_data
from data_pipeline.cache import build_once
from data_pipeline.corpus import top_level_units


def test_prepare_data_writes_the_same_real_stdlib_text_every_time(tmp_path):
    first = prepare_data(tmp_path / "a", max_bytes=200_000, num_shards=3)
    second = prepare_data(tmp_path / "b", max_bytes=200_000, num_shards=3)
    assert [p.name for p in first] == [p.name for p in second]
    assert all(filecmp.cmp(a, b, shallow=False) for a, b in zip(first, second))
    records = [json.loads(line) for shard in first for line in shard.read_text(encoding="utf-8").splitlines()]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert sum(len(r["text"]) for r in records) >= 200_000 * 0.9
    for r in records:  # each document is the exact source lines at its "file:line" id
        path, line = r["id"].rsplit(":", 1)
        source = (stdlib / path).read_text(encoding="utf-8").splitlines(keepends=True)
        unit = r["text"].splitlines(keepends=True)
        assert source[int(line) - 1:int(line) - 1 + len(unit)] == unit, r["id"]
    assert len({Path(r["id"]).parts[0] for r in records}) > 5, "the sample should spread over the library"
    assert len(records) > 3 * len({r["id"].rsplit(":", 1)[0] for r in records}), "documents are definitions, not files"


def test_a_module_splits_into_its_top_level_definitions():
    module = '"""Doc."""\nimport os\n\n@cache\n@wraps(f)\ndef f():\n    def inner():\n        pass\n\nclass C:\n    x = 1\n'
    units = top_level_units(module)
    assert [line for line, _ in units] == [1, 4, 10]
    assert units[1][1].startswith("@cache\n@wraps(f)\ndef f():") and "def inner" in units[1][1]
    assert "".join(unit for _, unit in units) == module


def test_default_config_builds_corpus_and_tokenizer_once_and_trains_on_it(tmp_path):
    cfg = DataConfig(cache_dir=tmp_path / "cache", vocab_size=600, seq_len=32, num_workers=0)
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.get_vocab_size() == 600
    assert all(tokenizer.token_to_id(token) is not None for token in SPECIAL_TOKENS)
    assert len(SPECIAL_TOKENS) == 103 and "<extra_id_99>" in SPECIAL_TOKENS
    assert [tokenizer.token_to_id(token) for token in (EOD, PAD, "<extra_id_0>", "<extra_id_99>", MASK)] == \
        [0, 1, 2, 101, 102], "the mask came last, leaving the ids of the earlier special tokens as they were"
    text = "def main():\n    return 'héllo'\n"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    cached = sorted((tmp_path / "cache").iterdir())
    stamps = [p.stat().st_mtime_ns for p in cached]
    batch = next(build_dataloader(cfg, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0))
    assert batch.shape == (2, 33)
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "cache").iterdir())] == stamps, "cache was rebuilt"
    assert tokenizer.token_to_id(PAD) not in batch.flatten().tolist()
    assert tokenizer.token_to_id(EOD) != tokenizer.token_to_id(PAD)


def build_slowly(tmp: Path) -> None:
    with open(tmp.parent.parent / "builds.log", "a") as log:
        log.write("built\n")
    time.sleep(0.5)
    tmp.write_text("artifact")


def test_ranks_starting_together_build_a_cached_artifact_once(tmp_path):
    ranks = [
        multiprocessing.get_context("fork").Process(target=build_once, args=(tmp_path / "artifact.txt", build_slowly))
        for _ in range(3)
    ]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout=60)
    assert [rank.exitcode for rank in ranks] == [0, 0, 0]
    assert (tmp_path / "artifact.txt").read_text() == "artifact"
    assert (tmp_path / "builds.log").read_text() == "built\n"
    assert {p.name for p in tmp_path.iterdir()} == {"artifact.txt", "builds.log", ".artifact.txt.lock"}, "temp left over"
