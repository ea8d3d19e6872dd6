"""Issue 4, points 3 and 6-9: damaged checkpoints, crash restarts, preemption signals, failed saves and
consolidation, each through the real `parallax` command: torchrun, two gloo ranks, the data pipeline.

Every run trains the same 30 steps; one uninterrupted run is the reference, and each recovered run
must end on exactly its final loss (CPU fp32 resume is bitwise).
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from launcher.cli import main
from launcher.errors import REQUEUE_EXIT_CODE, SAVE_FAILED_EXIT_CODE
from parallel.checkpoint import verify
from tests.distributed.scenarios_checkpoint import read_full_tensors

STEPS, INTERVAL = 30, 5
PARALLAX = [sys.executable, "-c", "from launcher.cli import main; main()"]
TINY = ["configs/gpt-tiny.yaml", "--nproc", "2", "model.num_layers=2", "model.hidden_size=64", "model.max_seq_len=32",
        "data.seq_len=32", f"train.steps={STEPS}", f"checkpoint.interval={INTERVAL}", "checkpoint.keep=3",
        "logging.interval=1000"]


# Issue 25: the same model and global batch (2 micro-batches of 4) through a 2-stage pipeline, one layer a stage
PP2 = ("parallel.pp=2", "train.grad_accum=2")


def parallax_train(run_dir: Path, *extra: str, shell_prefix: str = "") -> subprocess.CompletedProcess:
    cmd = [*PARALLAX, "train", *TINY, f"logging.run_dir={run_dir}", *extra]
    if shell_prefix:  # e.g. a file-size limit the ranks inherit
        cmd = ["bash", "-c", f'{shell_prefix}; exec "$@"', "bash", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def start_training(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*PARALLAX, "train", *TINY, f"logging.run_dir={run_dir}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def final_loss(run_dir: Path) -> float:
    """The loss of the last step, as the run that finished it logged it (a restarted run logs some steps twice)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["step"] == STEPS and "loss" in r]  # not its evaluation's record
    assert last, f"step {STEPS} never ran"
    return last[-1]["loss"]


def rank_processes(launcher: subprocess.Popen, timeout: float = 120) -> dict[int, psutil.Process]:
    """The rank processes torchrun started, by rank (DataLoader workers are their children, not these)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ranks = {}
        for child in psutil.Process(launcher.pid).children():
            try:
                if "launcher.entry" in child.cmdline():
                    ranks[int(child.environ()["RANK"])] = child
            except (psutil.NoSuchProcess, KeyError):
                pass
        if len(ranks) == 2:
            return ranks
        time.sleep(0.05)
    raise AssertionError("the ranks never started")


def wait_for(path: Path, launcher: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert launcher.poll() is None, f"the run ended before {path} appeared:\n{launcher.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    proc = parallax_train(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def pp2_reference(tmp_path_factory) -> Path:
    """The reference run at PP=2: its checkpoints are those of a pipeline, and its final loss what a PP=2
    run that was interrupted must end on."""
    run_dir = tmp_path_factory.mktemp("pp2-reference")
    proc = parallax_train(run_dir, *PP2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


# The uninterrupted run of each layout the crash and preemption tests run at, and its overrides.
LAYOUTS = {"pp1": ("reference", ()), "pp2": ("pp2_reference", PP2)}


def wait_for_workers(ranks, launcher: subprocess.Popen, timeout: float = 300) -> None:
    """Until every rank has started its DataLoader workers (its child processes)."""
    deadline = time.time() + timeout
    while not all(rank.children() for rank in ranks):
        assert launcher.poll() is None, f"the run ended before its workers started:\n{launcher.stdout.read()[-3000:]}"
        assert time.time() < deadline, "the DataLoader workers never started"
        time.sleep(0.05)


def checkpoints(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def test_save_keeps_the_last_k_and_points_latest_at_the_newest(reference):
    root = checkpoints(reference)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000020", "step-00000025", "step-00000030"]
    assert (root / "latest").read_text() == "step-00000030"
    for step_dir in root.glob("step-*"):
        assert verify(step_dir) is None
        names = set(json.loads((step_dir / "manifest.json").read_text())["files"])
        assert names == {"shard-00000.pt", "shard-00001.pt", "data-00000.pt", "data-00001.pt", "client.pt", "config.yaml"}
    client = torch.load(root / "step-00000030" / "client.pt", weights_only=True)
    assert client["step"] == STEPS and client["tokens"] == STEPS * 8 * 32  # micro-batch 4 x DP 2 x seq_len 32
    assert "data" not in client and client["layout"] == {"world_size": 2, "tp": 1, "ep": 1, "dp": 2, "pp": 1, "stage_layers": [2], "zero_stage": 1}


def test_the_loop_logs_how_long_it_waited_for_data(reference):
    """Issue 3: the loop's wait for the pipeline is measured over each logging interval (here the
    first step, then each saving step); the first step waits for the DataLoader worker to start, so
    a loader that reported nothing would fail here."""
    records = [r for r in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    timed = [r for r in records if "data_wait_seconds" in r]
    assert [r["step"] for r in timed] == [1, *range(INTERVAL, STEPS + 1, INTERVAL)]
    waits = [r["data_wait_seconds"] for r in timed]
    assert all(w >= 0 for w in waits) and waits[0] > 0
    assert all(r["data_wait_seconds"] < r["step_seconds"] for r in timed)


@pytest.mark.parametrize("run,nproc,overrides,layout", [
    pytest.param("reference", 2, ("parallel.tp=2", "train.micro_batch_size=8"), "world=2 tp=2 ep=1 pp=1 dp=1",
                 id="at-tp2"),
    # issue 25: `parallax eval` runs the pipeline's forward-only schedule, scored on the last stage
    pytest.param("reference", 2, PP2, "world=2 tp=1 ep=1 pp=2 dp=1", id="at-pp2"),
    # issue 25: a PP=2 checkpoint (and the PP=2 run's own evaluation) against one process
    pytest.param("pp2_reference", 1, ("parallel.pp=1",), "world=1 tp=1 ep=1 pp=1 dp=1",
                 id="pp2-checkpoint-at-one-rank"),
])
def test_parallax_eval_of_a_checkpoint_at_another_layout_equals_the_runs_own_evaluation(request, tmp_path, run, nproc,
                                                                                         overrides, layout):
    """Issue 15 point 5: the run evaluated its step-30 weights at its own layout (DP=2 ZeRO-1, or PP=2);
    `parallax eval` loads its step-30 checkpoint at another (the same global batch of 8 windows) and must
    find the same loss."""
    reference = request.getfixturevalue(run)
    out = tmp_path / "eval.json"
    proc = subprocess.run([*PARALLAX, "eval", str(reference), "--nproc", str(nproc), *overrides, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    in_training = [r for r in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())
                   if "eval_loss" in r]
    assert [r["step"] for r in in_training] == [0, STEPS]
    result = json.loads(out.read_text())
    assert result["step"] == STEPS and result["layout"] == layout
    assert result["eval_tokens"] == in_training[-1]["eval_tokens"]
    assert abs(result["eval_loss"] - in_training[-1]["eval_loss"]) <= 1e-5
    assert f"loss {result['eval_loss']:.4f}" in proc.stdout


@pytest.mark.parametrize("damage", ["truncate", "alter", "delete"])
def test_verify_names_the_damaged_file(reference, tmp_path, damage):
    step_dir = tmp_path / "step"
    shutil.copytree(checkpoints(reference) / "step-00000030", step_dir)
    shard = step_dir / "shard-00001.pt"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "alter":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 1
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    assert str(shard) in verify(step_dir)


def test_resume_auto_refuses_a_damaged_checkpoint_and_uses_the_previous_one(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shard = checkpoints(run_dir) / "step-00000030" / "shard-00000.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    (run_dir / "metrics.jsonl").unlink()
    proc = parallax_train(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused = [line for line in proc.stdout.splitlines() if "skipping checkpoint" in line]
    assert len(refused) == 1 and str(shard) in refused[0] and "truncated" in refused[0], proc.stdout
    assert f"resumed from {checkpoints(run_dir) / 'step-00000025'} at step 25" in proc.stdout
    assert final_loss(run_dir) == final_loss(reference)
    assert verify(checkpoints(run_dir) / "step-00000030") is None, "the damaged checkpoint is replaced by a good one"


def test_resume_auto_with_no_usable_checkpoint_says_it_starts_afresh(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for shard in checkpoints(run_dir).glob("step-*/shard-00001.pt"):
        shard.write_bytes(shard.read_bytes()[:1000])
    proc = parallax_train(run_dir, f"train.steps={INTERVAL}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum("skipping checkpoint" in line for line in proc.stdout.splitlines()) == 3, proc.stdout[-3000:]
    assert (f"warning: no checkpoint under {checkpoints(run_dir)} is usable (3 skipped): starting afresh at step 0"
            in proc.stdout), proc.stdout[-3000:]
    assert verify(checkpoints(run_dir) / f"step-{INTERVAL:08d}") is None


def test_a_run_started_afresh_below_an_earlier_runs_steps_keeps_and_resumes_its_own_checkpoints(reference, tmp_path):
    """checkpoint.keep counts saves, newest saved first, not step numbers: a run started afresh (--resume none,
    or past checkpoints it found damaged) where an earlier run saved steps 20-30 saved its own step 5 and 10,
    and a save that pruned by step number deleted them as soon as they were written; auto then resumed step 30."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    root = checkpoints(run_dir)
    proc = parallax_train(run_dir, "checkpoint.resume=none", "train.steps=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000005", "step-00000010", "step-00000030"]
    assert (root / "latest").read_text() == "step-00000010"
    proc = parallax_train(run_dir, "train.steps=15")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {root / 'step-00000010'} at step 10" in proc.stdout, proc.stdout[-3000:]


def test_a_save_whose_latest_cannot_be_rewritten_is_saved_and_says_so(reference, tmp_path):
    """Renaming the checkpoint into place commits it; `latest` is only a pointer for people and tools. A save
    that failed to rewrite it was reported failed (exit 74) though its checkpoint was there and resumable."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    root = checkpoints(run_dir)
    (root / ".latest.tmp").mkdir()  # where `latest` is written before its rename: now it cannot be
    proc = parallax_train(run_dir, f"train.steps={STEPS + INTERVAL}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = root / f"step-{STEPS + INTERVAL:08d}"
    assert verify(saved) is None
    warnings = [line for line in proc.stdout.splitlines() if "still names the one before" in line]
    assert len(warnings) == 1 and str(saved) in warnings[0], proc.stdout[-3000:]
    assert (root / "latest").read_text() == f"step-{STEPS:08d}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sigterm_and_sigusr1_save_and_exit_requeue_then_resume(request, tmp_path, layout):
    """At PP=2 the two ranks are the two stages: each gets its own signal, they vote, and both save."""
    uninterrupted, overrides = LAYOUTS[layout]
    reference = request.getfixturevalue(uninterrupted)
    run_dir = tmp_path / "run"
    launcher = start_training(run_dir, *overrides)
    ranks = rank_processes(launcher)
    wait_for(checkpoints(run_dir) / "step-00000005", launcher)
    ranks[0].send_signal(signal.SIGTERM)  # as SLURM delivers them, to each rank and not all at the same instant
    ranks[1].send_signal(signal.SIGUSR1)
    output, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == REQUEUE_EXIT_CODE, output[-3000:]
    stopped = int((checkpoints(run_dir) / "latest").read_text()[5:])
    assert 5 <= stopped < STEPS and f"stopping after step {stopped}" in output
    assert f"stopped after step {stopped}" in output and "Traceback" not in output

    proc = parallax_train(run_dir, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {checkpoints(run_dir) / f'step-{stopped:08d}'}" in proc.stdout
    assert final_loss(run_dir) == final_loss(reference)


@pytest.mark.parametrize("sender", ["parallax train, which passes it on", "every process of each rank"])
def test_a_sigterm_that_reaches_the_dataloader_workers_too_still_saves(tmp_path, sender):
    """torchrun passes a SIGTERM on to each rank's whole process group, and SLURM's scancel and preemption
    signal every process of the job step: the DataLoader worker (data.num_workers=1) gets it as well. It
    died of it, and its rank raised "DataLoader worker is killed by signal" instead of saving, while the
    launcher still exited 75, "saved, requeue me"."""
    run_dir = tmp_path / "run"
    launcher = start_training(run_dir, "train.steps=100000", "checkpoint.interval=100000", "data.num_workers=1")
    ranks = rank_processes(launcher)
    wait_for_workers(ranks.values(), launcher)
    if sender.startswith("parallax"):
        launcher.send_signal(signal.SIGTERM)
    else:
        for rank in ranks.values():
            os.killpg(rank.pid, signal.SIGTERM)  # torchrun starts each rank as the leader of its own group
    output, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == REQUEUE_EXIT_CODE, output[-3000:]
    assert "killed by signal" not in output and "Traceback" not in output, output[-3000:]
    stopped = int((checkpoints(run_dir) / "latest").read_text()[5:])
    assert f"stopped after step {stopped} with a checkpoint" in output
    assert verify(checkpoints(run_dir) / f"step-{stopped:08d}") is None


def start_rank(run_dir: Path, rank: int, port: int) -> subprocess.Popen:
    """One rank started as srun starts it: the entry point alone, with torch's env:// variables."""
    config, _, _, *overrides = TINY  # without --nproc 2, which is the launcher's
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "launcher.entry", config, *overrides, f"logging.run_dir={run_dir}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until_it_catches(rank: subprocess.Popen, signum: int, timeout: float = 120) -> None:
    """Until the process has a handler for `signum` (the kernel's SigCgt mask in /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert rank.poll() is None, f"the rank ended:\n{rank.stdout.read()[-3000:]}"
        status = Path(f"/proc/{rank.pid}/status").read_text()
        caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M)[1], 16)
        if caught >> (signum - 1) & 1:
            return
        time.sleep(0.01)
    raise AssertionError(f"the rank never caught {signal.Signals(signum).name} while it waited for its peer")


def test_a_warning_signal_during_start_up_is_kept_and_stops_after_the_first_step(reference, tmp_path):
    """SLURM's warning may land while a rank is still starting: importing, waiting for its peers,
    building the model, loading the checkpoint. Rank 0 gets it while its peer has not even started;
    it must not die but stop after its first step with a complete checkpoint."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(checkpoints(run_dir) / "step-00000030")
    (checkpoints(run_dir) / "latest").write_text("step-00000025")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first = start_rank(run_dir, 0, port)
    wait_until_it_catches(first, signal.SIGUSR1)
    first.send_signal(signal.SIGUSR1)
    time.sleep(0.5)
    assert first.poll() is None, f"the warning killed the rank:\n{first.stdout.read()[-3000:]}"
    second = start_rank(run_dir, 1, port)
    outputs = [rank.communicate(timeout=600)[0] for rank in (first, second)]
    assert [first.returncode, second.returncode] == [REQUEUE_EXIT_CODE] * 2, outputs[0][-3000:] + outputs[1][-3000:]
    assert "resumed from" in outputs[0] and "stopping after step 26 (SIGUSR1)" in outputs[0], outputs[0][-3000:]
    assert (checkpoints(run_dir) / "latest").read_text() == "step-00000026"
    assert verify(checkpoints(run_dir) / "step-00000026") is None  # resuming from it is the SIGTERM test's


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_rank_killed_mid_run_restarts_the_job_from_its_last_checkpoint(request, tmp_path, layout):
    """At PP=2 the rank killed is the last stage, which scores the loss and holds the tied embedding's copy."""
    uninterrupted, overrides = LAYOUTS[layout]
    reference = request.getfixturevalue(uninterrupted)
    run_dir = tmp_path / "run"
    launcher = start_training(run_dir, *overrides, "--max-restarts", "1")
    ranks = rank_processes(launcher)
    wait_for(checkpoints(run_dir) / "step-00000010", launcher)
    workers = ranks[1].children()  # its DataLoader worker must not outlive it
    ranks[1].kill()
    output, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, output[-3000:]
    resumed = re.findall(r"resumed from .*step-(\d+) at step", output)
    assert len(resumed) == 1 and int(resumed[0]) >= 10, output[-3000:]  # the newest checkpoint when the kill landed
    assert final_loss(run_dir) == final_loss(reference)
    assert workers and not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


KILL_DURING_BACKGROUND_WRITE = """
import os, signal, threading
from pathlib import Path

marker = Path(os.environ["PARALLAX_TEST_MARKER"])
if os.environ.get("RANK") == "1" and not marker.exists():  # the first rank 1 only, not its restart
    from parallel.checkpoint import storage

    write = storage.save_file

    def save_file(obj, path):
        if path.parent.name == ".step-00000010.tmp":
            marker.write_text(threading.current_thread().name)
            os.kill(os.getpid(), signal.SIGKILL)
        return write(obj, path)

    storage.save_file = save_file
"""


def test_a_rank_killed_while_its_checkpoint_is_written_in_the_background_resumes_from_the_one_before(
        reference, tmp_path):
    """Issue 17 point 5: rank 1 dies (SIGKILL, injected through sitecustomize) as its background thread
    starts writing the step-10 shard. Step 10 is never committed, `latest` stays at step 5, and the
    restarted job resumes from there to the reference's final loss."""
    run_dir, inject = tmp_path / "run", tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(KILL_DURING_BACKGROUND_WRITE)
    marker = tmp_path / "killed-in"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(inject), str(Path(__file__).resolve().parents[1])]),
           "PARALLAX_TEST_MARKER": str(marker)}
    proc = subprocess.run([*PARALLAX, "train", *TINY, f"logging.run_dir={run_dir}", "--max-restarts", "1"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert marker.read_text() == "checkpoint-save", "the kill must land in the background save's thread"
    assert re.findall(r"resumed from .*step-(\d+) at step", proc.stdout) == ["00000005"], proc.stdout[-3000:]
    assert final_loss(run_dir) == final_loss(reference)
    root = checkpoints(run_dir)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000020", "step-00000025", "step-00000030"]


def test_a_failed_save_is_one_line_and_leaves_the_previous_checkpoint(reference, tmp_path):
    """A file-size limit makes every shard write fail part-way (EFBIG), as a full disk would (ENOSPC)."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    root = checkpoints(run_dir)
    for step in (25, 30):
        shutil.rmtree(root / f"step-{step:08d}")
    (root / "latest").write_text("step-00000020")
    proc = parallax_train(run_dir, shell_prefix="ulimit -f 1024")  # 1 MiB; a shard is 6 MB
    assert proc.returncode == SAVE_FAILED_EXIT_CODE, proc.stderr[-3000:]
    warnings = [line for line in proc.stdout.splitlines() if "checkpoint of step" in line]
    assert len(warnings) == 1 and "step 25 failed" in warnings[0] and "File too large" in warnings[0], proc.stdout
    assert f"{root / 'step-00000020'} is intact" in warnings[0]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("parallax: error")]
    assert len(errors) == 1 and "checkpoint of step 30 failed" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000020"], "no partial checkpoint is left"
    assert (root / "latest").read_text() == "step-00000020" and verify(root / "step-00000020") is None


def test_consolidate_writes_the_full_fp32_model(reference, tmp_path, capsys):
    out = tmp_path / "model.pt"
    main(["checkpoint", "consolidate", str(reference), "--step", "25", "--out", str(out)])
    assert f"wrote {out}" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    saved = read_full_tensors(checkpoints(reference) / "step-00000025")
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[name], saved[name]["param"]) and state[name].dtype == torch.float32 for name in state)
    assert state["embedding.weight"].shape == (8192, 64)


def test_consolidate_refuses_a_damaged_checkpoint_in_one_line(reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (checkpoints(run_dir) / "step-00000030" / "client.pt").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["checkpoint", "consolidate", str(run_dir), "--step", "30"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "client.pt is missing" in err and "step-00000030" in err


# --- issue 25: a PP=2 run's checkpoints, and the commands that read them ---------------------------

def test_a_pipelines_checkpoint_holds_each_tensor_once_and_one_loader_state(reference, pp2_reference):
    """Each stage writes its own layers' shard, the tied embedding once (the first stage's; the last stage's
    copy is not written), and the first stage alone the loader state both stages read from: the same names
    and shapes as the PP=1 run's checkpoint."""
    step_dir = checkpoints(pp2_reference) / "step-00000030"
    assert verify(step_dir) is None
    assert set(json.loads((step_dir / "manifest.json").read_text())["files"]) == {
        "shard-00000.pt", "shard-00001.pt", "data-00000.pt", "client.pt", "config.yaml"}
    client = torch.load(step_dir / "client.pt", weights_only=True)
    assert client["layout"] == {"world_size": 2, "tp": 1, "ep": 1, "dp": 1, "pp": 2, "stage_layers": [1, 1],
                                "zero_stage": 1}
    shards = [set(torch.load(step_dir / f"shard-0000{rank}.pt", weights_only=True)["pieces"]) for rank in (0, 1)]
    assert not shards[0] & shards[1]
    assert {"embedding.weight", "position_embedding.weight"} <= shards[0] and "final_norm.weight" in shards[1]
    assert all(name.startswith(("blocks.0.", "embedding", "position")) for name in shards[0])
    pipelined, whole = read_full_tensors(step_dir), read_full_tensors(checkpoints(reference) / "step-00000030")
    assert {k: v["param"].shape for k, v in pipelined.items()} == {k: v["param"].shape for k, v in whole.items()}


def test_consolidate_export_and_generate_read_a_pipelines_checkpoint(pp2_reference, tmp_path, capsys):
    """`parallax checkpoint consolidate` writes the PP=2 checkpoint's full model; `parallax export` makes it
    a GPT2LMHeadModel whose held-out loss, computed by transformers on the run's validation windows, is the
    loss the PP=2 run's own evaluation (through the pipeline, scored on the last stage with its copy of the
    tied embedding) found; and `parallax generate` from the checkpoint prints what it prints from the export."""
    from transformers import GPT2LMHeadModel

    from data_pipeline.validation import validation_batches
    from launcher.config import load_config

    out = tmp_path / "model.pt"
    main(["checkpoint", "consolidate", str(pp2_reference), "--out", str(out)])
    assert f"wrote {out}" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    saved = read_full_tensors(checkpoints(pp2_reference) / f"step-{STEPS:08d}")
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[name], saved[name]["param"]) for name in state)

    hf_dir = tmp_path / "hf"
    main(["export", str(pp2_reference), "--out", str(hf_dir)])
    assert "GPT-2" in capsys.readouterr().out
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    assert torch.equal(hf.transformer.wte.weight, state["embedding.weight"][:8192])
    assert torch.equal(hf.transformer.ln_f.weight, state["final_norm.weight"])  # the last stage's
    cfg = load_config(checkpoints(pp2_reference) / f"step-{STEPS:08d}" / "config.yaml")
    windows = torch.cat(validation_batches(cfg.data, batches=cfg.train.eval_batches, micro_batch_size=8, grad_accum=1,
                                           dp_rank=0, dp_size=1, seed=cfg.train.seed))
    with torch.no_grad():
        logits = hf(windows[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), windows[:, 1:].flatten()).item()
    in_training = [r for r in map(json.loads, (pp2_reference / "metrics.jsonl").read_text().splitlines())
                   if r.get("step") == STEPS and "eval_loss" in r]
    assert in_training[0]["eval_tokens"] == windows[:, 1:].numel()
    assert abs(loss - in_training[0]["eval_loss"]) <= 1e-5, (loss, in_training)

    texts = []
    for source in (pp2_reference, hf_dir):
        main(["generate", str(source), "--prompt", "def main(", "--temperature", "0", "--max-new-tokens", "8"])
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("def main(")
