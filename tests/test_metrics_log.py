"""RUN_DIR/metrics.jsonl after a crash mid-write: a resumed run does not append to the torn line it left,
and `parallax status` reads the lines it can."""
import json

from launcher.cli import main
from launcher.run_log import RunLog

RECORDS = [{"step": 1, "loss": 9.0, "tokens_per_s": 100.0, "step_seconds": 0.5},
           {"step": 2, "loss": 8.5, "tokens_per_s": 120.0, "step_seconds": 0.4}]
TORN = b'{"step": 3, "loss": 8.'  # a record cut off where the crash came


def write_metrics(run_dir, tail: bytes) -> None:
    run_dir.mkdir(exist_ok=True)
    (run_dir / "metrics.jsonl").write_bytes("".join(json.dumps(r) + "\n" for r in RECORDS).encode() + tail)


def test_a_resumed_run_cuts_the_torn_last_line_off_before_it_appends(tmp_path, capsys):
    """The next record used to be appended to the torn one: `{"step": 3, "loss": 8.{"step": 3, ...`."""
    write_metrics(tmp_path, TORN)
    log = RunLog(tmp_path, total_steps=3, enabled=True)
    log.write([{"step": 3, "loss": 8.25, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 130.0}])
    log.close("done")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert warnings == [f"parallax: warning: cut a torn last line ({len(TORN)} bytes) off "
                        f"{tmp_path / 'metrics.jsonl'}: a run stopped while writing it"]


def test_a_whole_log_is_left_as_it_is(tmp_path, capsys):
    write_metrics(tmp_path, b"")
    before = (tmp_path / "metrics.jsonl").read_bytes()
    RunLog(tmp_path, total_steps=3, enabled=True).close("done")
    assert (tmp_path / "metrics.jsonl").read_bytes() == before and "warning" not in capsys.readouterr().out


def test_status_skips_the_lines_it_cannot_read_and_says_how_many(tmp_path, capsys):
    """A line that was not JSON (JSONDecodeError) or not UTF-8 (UnicodeDecodeError) used to crash it."""
    write_metrics(tmp_path, b"\xff\xfe not text\n" + TORN)
    main(["status", str(tmp_path)])
    captured = capsys.readouterr()
    assert "progress    step 2/?, loss 8.5000, 120 tokens/s, 0.400 s/step (last logged step)" in captured.out
    assert captured.err == f"parallax: warning: skipped 2 unreadable lines of {tmp_path / 'metrics.jsonl'}\n"
