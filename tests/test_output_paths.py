"""Where commands and runs write: a destination that cannot be written is refused in one line before the
work, not with a traceback after it, and one that should not be written (a checkpoint's files, a directory
holding other files) is refused rather than written over."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main
from parallel.checkpoint import verify
from tests.test_export import TINY, _write_checkpoint

PARALLAX = [sys.executable, "-c", "from launcher.cli import main; main()"]
CANNOT_WRITE_PROC = "cannot write in /proc (No such file or directory); name a path you can write"


@pytest.fixture
def places(tmp_path):
    """A run with one checkpoint, a plain file, a directory holding a file, and an empty directory."""
    run = tmp_path / "run"
    checkpoint = _write_checkpoint(run / "checkpoints" / "step-00000001", TINY)
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("keep me")
    (tmp_path / "empty").mkdir()
    return {"RUN": run, "CKPT": checkpoint, "FILE": tmp_path / "notes.txt", "FULL": tmp_path / "full",
            "EMPTY": tmp_path / "empty", "SOURCE": Path(__file__)}


@pytest.mark.parametrize("args,expected", [
    (["eval", "{RUN}", "--out", "/proc/x/eval.json"], f"--out /proc/x/eval.json: {CANNOT_WRITE_PROC}"),
    (["eval", "{RUN}", "--out", "{FILE}/eval.json"],
     "--out {FILE}/eval.json: {FILE} is a file, not a directory; name a path you can write"),
    (["eval", "{RUN}", "--out", "{EMPTY}"], "--out {EMPTY} is a directory; name the file to write"),
    (["eval", "{RUN}", "--out", "{CKPT}/config.yaml"],
     "--out {CKPT}/config.yaml writes into checkpoint {CKPT}; name a path outside it"),
    (["checkpoint", "consolidate", "{RUN}", "--out", "/proc/x.pt"], f"--out /proc/x.pt: {CANNOT_WRITE_PROC}"),
    (["checkpoint", "consolidate", "{RUN}", "--out", "{CKPT}/model.pt"],
     "--out {CKPT}/model.pt writes into checkpoint {CKPT}; name a path outside it"),
    (["export", "{RUN}", "--out", "/proc/hf"], f"--out /proc/hf: {CANNOT_WRITE_PROC}"),
    (["export", "{RUN}", "--out", "{FILE}"], "--out {FILE} is a file; name a directory"),
    (["export", "{RUN}", "--out", "{FULL}"], "--out {FULL} is not empty; name a new or empty directory"),
    (["export", "{RUN}", "--out", ""], "--out is empty; name a path"),
    (["export", "{RUN}", "--out", "{CKPT}/hf"],
     "--out {CKPT}/hf writes into checkpoint {CKPT}; name a path outside it"),
    (["prepare-data", "/proc/pd"], f"OUT_DIR /proc/pd: {CANNOT_WRITE_PROC}"),
    (["prepare-data", "{FILE}"], "OUT_DIR {FILE} is a file; name a directory"),
    (["prepare-tokenizer", "{SOURCE}", "--out", "/proc/t.json"], f"--out /proc/t.json: {CANNOT_WRITE_PROC}"),
    (["prepare-tokenizer", "{SOURCE}", "--out", "{EMPTY}"], "--out {EMPTY} is a directory; name the file to write"),
    (["tokenize", "{SOURCE}", "--out", "/proc/corpus"], f"--out /proc/corpus: {CANNOT_WRITE_PROC}"),
    (["tokenize", "{SOURCE}", "--out", "{EMPTY}"], "--out {EMPTY} is a directory; name the file to write"),
])
def test_a_destination_that_cannot_or_must_not_be_written_is_refused_in_one_line_before_the_work(
        places, capsys, monkeypatch, args, expected):
    """eval used to fail only after evaluating, and wrote over a checkpoint's file; export reported a file it
    could not write as written, and wrote over another model's config.json."""
    monkeypatch.setattr("launcher.cli._launch", lambda *_: pytest.fail("eval started its ranks"))
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(**places) for arg in args])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"parallax: error: {expected.format(**places)}\n"
    assert places["FILE"].read_text() == "keep me" and (places["FULL"] / "config.json").read_text() == "keep me"
    assert verify(places["CKPT"]) is None and sorted(p.name for p in places["CKPT"].iterdir()) == [
        "config.yaml", "manifest.json"]
    assert not any(places["EMPTY"].iterdir())


def test_eval_keeps_its_default_result_beside_the_checkpoint_it_evaluates(places, monkeypatch):
    """The rule is for paths a user names: eval's own default, CHECKPOINT/eval.json, stays where it was."""
    launched = []
    monkeypatch.setattr("launcher.cli._launch", lambda entry_args, *_, **__: launched.append(entry_args))
    main(["eval", str(places["RUN"])])
    assert launched[0][:2] == ["--evaluate", str((places["CKPT"] / "eval.json").resolve())]


@pytest.mark.parametrize("field", ["logging.run_dir", "checkpoint.dir"])
def test_a_run_or_checkpoint_dir_that_cannot_be_written_stops_the_run_in_one_line_before_it_builds(tmp_path, field):
    """rank 0 made the run directory only after building the model, engine and data, and died with
    FileExistsError; a checkpoint.dir was first written at the first save, a warning each interval and a
    failed run (exit 74) at the last step."""
    (tmp_path / "notes.txt").write_text("keep me")
    proc = subprocess.run([*PARALLAX, "train", "configs/gpt-tiny.yaml", "--nproc", "2", "model.num_layers=2",
                           "train.steps=2", f"logging.run_dir={tmp_path / 'run'}", f"{field}={tmp_path / 'notes.txt'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = proc.stderr.splitlines()  # the one rank that says it first: every rank checks checkpoint.dir
    assert re.fullmatch(rf"parallax: error \(rank [01]\): {field} {tmp_path / 'notes.txt'} is a file; name a directory",
                        line), line
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("cache_dir,strerror", [("/proc/forbidden", "No such file or directory"),
                                                ("{FILE}", "File exists")])
def test_a_data_cache_that_cannot_be_written_is_one_line(places, cache_dir, strerror):
    """Every rank builds the built-in corpus into data.cache_dir, and died with FileNotFoundError or
    FileExistsError."""
    from data_pipeline import DataError
    from data_pipeline.corpus import builtin_corpus

    cache_dir = cache_dir.format(**places)
    with pytest.raises(DataError) as error:
        builtin_corpus(Path(cache_dir))
    assert str(error.value) == (f"cannot cache data in {cache_dir} ({strerror}); set data.cache_dir (or "
                                "$PARALLAX_CACHE) to a directory you can write")
