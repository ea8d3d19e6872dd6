"""Issue 29 points 3-5 on real ranks (`parallax train`, 2 ranks, faults through PARALLAX_FAULTS): a stalled rank
makes every rank write its stacks and the run end naming it; a delayed rank is named as the straggler; and
train.profile_steps writes traces where TensorBoard's profile plugin reads them."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from launcher.errors import HANG_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
PARALLAX = [sys.executable, "-c", "from launcher.cli import main; main()"]
TINY = ["configs/gpt-tiny.yaml", "--nproc", "2", "model.num_layers=1", "logging.interval=1"]
HANG_SECONDS = 5


def train(run_dir: Path, faults: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    return subprocess.run([*PARALLAX, "train", *TINY, f"logging.run_dir={run_dir}", *overrides], cwd=REPO,
                          env=env | {"PARALLAX_FAULTS": faults}, capture_output=True, text=True, timeout=600)


def test_a_stalled_rank_makes_every_rank_write_its_stacks_and_is_named_within_hang_seconds(tmp_path):
    run = tmp_path / "run"
    proc = train(run, "stall@3:1:600", "train.steps=6", f"train.hang_seconds={HANG_SECONDS}")
    ended = time.time()
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if line.startswith("parallax: error")]
    assert proc.returncode == HANG_EXIT_CODE, "\n".join(lines[-40:])
    assert len(errors) == 1 and errors[0].startswith(
        f"parallax: error: hang: no progress for {HANG_SECONDS} s (train.hang_seconds); rank 1 is the slowest, at "
        "step 3 (start) in "), errors
    assert "launcher/faults.py" in errors[0] and "begin_step" in errors[0], errors[0]
    stacks = {rank: (run / "hang" / f"rank-{rank}.txt").read_text() for rank in (0, 1)}
    assert all("Thread parallax-hang-watchdog" in text and "Thread MainThread" in text for text in stacks.values())
    assert "step: 3\nphase: forward/backward/optimizer step" in stacks[0]  # waiting for rank 1 in a collective
    assert "torch/distributed" in stacks[0].split("Thread MainThread", 1)[1]
    assert "step: 3\nphase: start" in stacks[1] and "time.sleep(stall.amount)" in stacks[1]  # in its stall
    # the last record written (step 2's) is when rank 1 stalled; the run ended within hang_seconds + a few
    stalled = (run / "metrics.jsonl").stat().st_mtime
    assert ended - stalled < HANG_SECONDS + 8, ended - stalled
    assert not (run / "tensorboard" / "plugins").exists(), "no train.profile_steps: nothing is profiled"


def test_a_delayed_rank_is_named_as_the_straggler_and_chosen_steps_are_profiled(tmp_path):
    """Rank 1 computes 0.5 s longer at steps 3 and 4: the logging step after them names it, once; steps 2-3 are
    traced on both ranks; and a run shorter than train.hang_seconds per phase ends as usual."""
    run = tmp_path / "run"
    proc = train(run, "delay@3:1:0.5;delay@4:1:0.5", "train.steps=5", "logging.interval=2",
                 "train.profile_steps=[2, 3]", f"train.hang_seconds={HANG_SECONDS}")
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, "\n".join(lines[-40:])
    warnings = [line for line in lines if "straggler" in line]
    assert len(warnings) == 1 and warnings[0].startswith("parallax: warning: rank 1 is a straggler: "), warnings
    records = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert records[4]["slowest_rank"] == 1 and records[4]["rank_cpu_seconds_max"] > 0.5
    assert records[4]["rank_cpu_seconds_min"] < 0.5 and records[2]["rank_cpu_seconds_max"] < 0.5
    traces = sorted((run / "tensorboard" / "plugins" / "profile" / "steps-2-3").glob("*.pt.trace.json"))
    assert [trace.name.split(".")[0] for trace in traces] == ["rank-0", "rank-1"], traces
    events = json.loads(traces[1].read_text())["traceEvents"]
    assert sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}) == [
        "ProfilerStep#0", "ProfilerStep#1"]
    assert not (run / "hang").exists()
