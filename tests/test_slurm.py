"""Issue 7 points 1-4 and issue 8 point 7: `parallax submit` and `parallax status` against a real SLURM.

tests/slurm_cluster.py starts munged, slurmctld and two slurmd (nodes n1, n2 of this machine).
Each job trains the tiny config on 2 nodes x 1 rank over gloo, the ranks finding each other from
srun's environment. One job runs uninterrupted; another gets the time-limit warning signal
mid-run (`scancel --signal=USR1 --batch`, as `--signal=B:USR1@T` delivers it), saves, requeues
itself, and once released resumes from its run directory to the uninterrupted run's final loss.
"""
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.slurm_cluster import SlurmCluster, SlurmUnavailable

REPO = Path(__file__).resolve().parents[1]
STEPS, INTERVAL = 30, 5
PARALLAX = [sys.executable, "-c", "from launcher.cli import main; main()"]
TINY = ["configs/gpt-tiny.yaml", "model.num_layers=2", f"train.steps={STEPS}", f"checkpoint.interval={INTERVAL}",
        "logging.interval=5"]
CPU_JOB = ["--nodes", "2", "--gpus-per-node", "0"]


def parallax(*args: str, env=None) -> subprocess.CompletedProcess:
    env = {**(env or os.environ), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*PARALLAX, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def submit(cluster: SlurmCluster, run_dir: Path) -> str:
    proc = parallax("submit", *TINY, *CPU_JOB, f"logging.run_dir={run_dir}", env=cluster.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = proc.stdout.split("submitted job ")[1].split(":")[0]
    assert (run_dir / "slurm-jobs").read_text().split()[0] == job_id
    return job_id


def wait_for_job(cluster: SlurmCluster, job_id: str, until, what: str, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = cluster.job(job_id)
        if until(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never {what}: {job}\n{job_output(cluster, job_id)}")


def job_output(cluster: SlurmCluster, job_id: str) -> str:
    path = Path(cluster.job(job_id)["StdOut"])
    return path.read_text() if path.exists() else f"({path} missing)\n{cluster.logs()}"


def finished(job: dict) -> bool:
    return job["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def last_record(run_dir: Path) -> dict:
    """The last step's record (the run's last evaluation follows it)."""
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r][-1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        try:
            cluster.start()
        except SlurmUnavailable as e:
            pytest.fail(f"SLURM tests cannot run: {e}", pytrace=False)
        yield cluster
    finally:  # also after a failed start: no daemon outlives the tests
        cluster.stop()


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    job_id = submit(cluster, run_dir)
    job = wait_for_job(cluster, job_id, finished, "finished")
    assert job["JobState"] == "COMPLETED", job_output(cluster, job_id)
    return run_dir, job_id


def run_script(script: str, tmp_path: Path, srun_exit_code: int, **slurm_env: str) -> tuple[int, list[str]]:
    """Run a rendered script as a job's batch shell would, with stand-ins for srun and scontrol that record
    their arguments and the environment the ranks would get. Returns the script's exit status and the calls."""
    stubs, calls = tmp_path / "bin", tmp_path / "calls"
    stubs.mkdir()
    for tool, code in (("srun", srun_exit_code), ("scontrol", 0)):
        (stubs / tool).write_text(f'#!/bin/bash\necho "{tool} $* | OMP_NUM_THREADS=$OMP_NUM_THREADS '
                                  f'CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS" >> {calls}\nexit {code}\n')
        (stubs / tool).chmod(0o755)
    proc = subprocess.run(["bash", "-c", script], env={"PATH": f"{stubs}:/usr/bin:/bin", "SLURM_JOB_ID": "7", **slurm_env},
                          capture_output=True, text=True, timeout=60)
    assert not proc.stderr, proc.stderr
    return proc.returncode, calls.read_text().splitlines()


def test_dry_run_prints_the_script_of_a_cpu_job_and_submits_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = parallax("submit", *TINY, *CPU_JOB, "--cpus-per-task", "2", "--time", "01:00:00", "--partition", "gpu",
                    f"logging.run_dir={run_dir}", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = proc.stdout
    for line in ("#!/bin/bash", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=2",
                 "#SBATCH --time=01:00:00", "#SBATCH --partition=gpu", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@300", f"#SBATCH --output={run_dir}/slurm-%j.out", "export DS_ACCELERATOR=cpu",
                 "export OMP_NUM_THREADS=$cpus_per_task", "parallel.timeout_minutes",
                 f'srun --kill-on-bad-exit=1 --cpus-per-task="$cpus_per_task" {sys.executable} -m launcher.entry '
                 f"{REPO / 'configs/gpt-tiny.yaml'} model.num_layers=2",
                 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in script, line
    # A CPU job shares its nodes, and the test cluster's srun has no GPUs to bind.
    for gpu_only in ("gpus-per-node=", "--exclusive", "--mem=0", "--gpu-bind", "CUDA_DEVICE_MAX_CONNECTIONS", "{{"):
        assert gpu_only not in script, gpu_only
    assert not run_dir.exists(), "a dry run writes nothing"

    status, calls = run_script(script, tmp_path, srun_exit_code=0, SLURM_CPUS_PER_TASK="2", SLURM_CPUS_ON_NODE="2")
    assert status == 0 and len(calls) == 1, calls  # finished: not requeued
    assert calls[0].startswith('srun --kill-on-bad-exit=1 --cpus-per-task=2 ') and calls[0].endswith(
        "| OMP_NUM_THREADS=2 CUDA_DEVICE_MAX_CONNECTIONS="), calls


def test_submit_from_a_non_editable_install_says_in_one_line_that_it_needs_the_source_checkout(tmp_path):
    """`pip install .` ships the Python packages but not slurm/job.sbatch."""
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(REPO)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    proc = subprocess.run([*PARALLAX, "submit", str(REPO / TINY[0]), *TINY[1:], *CPU_JOB, "--dry-run",
                           f"logging.run_dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(site), "DS_ACCELERATOR": "cpu"}, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert f"{site / 'slurm' / 'job.sbatch'} is missing" in proc.stderr and "pip install -e ." in proc.stderr


def test_submit_refuses_a_gpu_layout_that_cannot_fit_with_the_plans_advice(tmp_path):
    """T-NLG 17B without tensor parallelism needs ~75 GiB per 32 GB V100: refused before sbatch."""
    run_dir = tmp_path / "run"
    proc = parallax("submit", "configs/tnlg-17b.yaml", "--nodes", "16", "--gpus-per-node", "16", "--gpu", "v100",
                    "parallel.tp=1", f"logging.run_dir={run_dir}", "--dry-run")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "refused: the layout does not fit 16 x 16 V100-32GB" in proc.stdout
    assert "does NOT fit" in proc.stdout and "to fit, change one of:" in proc.stdout
    assert "parallel.zero_stage=3" in proc.stdout
    assert "#SBATCH" not in proc.stdout and not run_dir.exists()


def test_submit_renders_a_gpu_layout_that_fits_with_one_rank_per_gpu_on_whole_nodes(tmp_path):
    proc = parallax("submit", "configs/tnlg-17b.yaml", "--nodes", "16", "--gpus-per-node", "16", "--gpu", "v100",
                    f"logging.run_dir={tmp_path / 'run'}", "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fits" in proc.stderr
    script = proc.stdout
    for line in ("#SBATCH --nodes=16", "#SBATCH --ntasks-per-node=16", "#SBATCH --gpus-per-node=16",
                 "#SBATCH --exclusive", "#SBATCH --mem=0", "export DS_ACCELERATOR=cuda",
                 "export CUDA_DEVICE_MAX_CONNECTIONS=1", "export OMP_NUM_THREADS=$cpus_per_task",
                 'srun --kill-on-bad-exit=1 --cpus-per-task="$cpus_per_task" --gpu-bind=none '):
        assert line in script, line
    assert "--cpus-per-task=" not in script.replace('--cpus-per-task="$cpus_per_task"', "")

    # A node of 96 cores gives each of its 16 ranks 6; ranks that stop with a checkpoint requeue the job.
    status, calls = run_script(script, tmp_path, srun_exit_code=75, SLURM_CPUS_ON_NODE="96")
    assert status == 75 and len(calls) == 2, calls
    assert calls[0].startswith("srun --kill-on-bad-exit=1 --cpus-per-task=6 --gpu-bind=none ") and calls[0].endswith(
        "| OMP_NUM_THREADS=6 CUDA_DEVICE_MAX_CONNECTIONS=1"), calls
    assert calls[1].startswith("scontrol requeue 7 "), calls


def test_submit_renders_a_pipeline_layout_that_fits_its_published_cluster(tmp_path):
    """Issue 25: MT-NLG's TP=8 x PP=35 x DP=8 on 280 DGX A100s goes through the plan (every stage built on
    the meta device) and is rendered; the world size counts the pipeline stages."""
    proc = parallax("submit", "configs/mtnlg-530b.yaml", "--nodes", "280", "--gpus-per-node", "8", "--gpu", "a100",
                    f"logging.run_dir={tmp_path / 'run'}", "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "parallax submit: plan:" in proc.stderr and "fits" in proc.stderr
    for line in ("#SBATCH --nodes=280", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8"):
        assert line in proc.stdout, line


@pytest.mark.parametrize("nodes,expected", [
    ("3", "world size 3 is not divisible by tp x pp = 1x2; use a multiple of 2 ranks or change parallel.tp or "
          "parallel.pp"),
    ("2", None),
])
def test_submit_checks_a_cpu_pipelines_world_size_against_tp_x_pp(tmp_path, nodes, expected):
    run_dir = tmp_path / "run"
    proc = parallax("submit", *TINY, "parallel.pp=2", "--nodes", nodes, "--gpus-per-node", "0",
                    f"logging.run_dir={run_dir}", "--dry-run")
    if expected:
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr[-3000:]
        assert not proc.stdout
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "#SBATCH --nodes=2" in proc.stdout and " parallel.pp=2" in proc.stdout


def test_a_rank_whose_master_slurm_cannot_resolve_fails_in_one_line(cluster):
    """Under srun a rank asks slurmctld for the master's address; a node SLURM does not know is a clear error."""
    env = {**cluster.env, "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
           "SLURM_STEP_NODELIST": "nosuchnode", "SLURM_JOB_ID": "1"}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "launcher.entry", *TINY], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "parallax: error (SLURM task 0): scontrol show node --oneliner nosuchnode failed: Node nosuchnode not found"]


def test_a_finished_run_completes_on_two_nodes_and_is_not_requeued(cluster, uninterrupted):
    run_dir, job_id = uninterrupted
    job = cluster.job(job_id)
    assert job["Restarts"] == "0" and job["ExitCode"] == "0:0" and job["NodeList"] == "n[1-2]"
    output = job_output(cluster, job_id)
    assert "world=2 tp=1 ep=1 pp=1 dp=2" in output and f"done: {STEPS} steps" in output
    assert "requeueing" not in output
    assert last_record(run_dir)["step"] == STEPS
    assert (run_dir / "job.sbatch").read_text().startswith("#!/bin/bash")


def test_warning_signal_saves_requeues_and_resumes_to_the_uninterrupted_loss(cluster, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submit(cluster, run_dir)
    first_checkpoint = run_dir / "checkpoints" / f"step-{INTERVAL:08d}"
    deadline = time.time() + 600  # a job takes ~1 min to start on 2 idle cores, several when they are shared
    while not first_checkpoint.exists():
        assert not finished(cluster.job(job_id)), job_output(cluster, job_id)
        assert time.time() < deadline, f"{first_checkpoint} never appeared:\n{job_output(cluster, job_id)}"
        time.sleep(0.02)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)

    job = wait_for_job(cluster, job_id, lambda j: j["Restarts"] == "1" and j["JobState"] == "PENDING", "requeued")
    # SLURM holds a requeued job until a begin time in the future (its Reason turns to BeginTime).
    assert datetime.fromisoformat(job["EligibleTime"]) > datetime.now(), job
    stopped = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step-"))
    assert INTERVAL <= stopped < STEPS, "the signal came too late to interrupt the run"
    output = job_output(cluster, job_id)
    assert "warning signal: ranks save and stop" in output and f"stopping after step {stopped} (SIGUSR1)" in output
    assert f"requeueing job {job_id}" in output
    again = parallax("submit", *TINY, *CPU_JOB, f"logging.run_dir={run_dir}", env=cluster.env)
    assert again.returncode == 2 and f"job {job_id} of run {run_dir} is still PENDING" in again.stderr, again.stderr
    assert len((run_dir / "slurm-jobs").read_text().splitlines()) == 1

    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")  # else it waits out its begin time
    job = wait_for_job(cluster, job_id, finished, "finished after its requeue")
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", job_output(cluster, job_id)
    output = job_output(cluster, job_id)
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{stopped:08d}'}" in output
    assert output.count("requeueing") == 1

    reference_dir, _ = uninterrupted
    resumed, reference = last_record(run_dir), last_record(reference_dir)
    assert resumed["step"] == reference["step"] == STEPS
    assert resumed["loss"] == reference["loss"]
    # Both jobs' TensorBoard events in the run directory draw one curve, each step once.
    tensorboard = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    tensorboard.Reload()
    losses = tensorboard.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, STEPS + 1)) and losses[-1].value == pytest.approx(reference["loss"])
    print(f"stopped after step {stopped}; final loss {resumed['loss']} (uninterrupted {reference['loss']})")


def test_status_shows_job_state_last_checkpoint_and_throughput(cluster, uninterrupted, tmp_path):
    run_dir, job_id = uninterrupted
    proc = parallax("status", str(run_dir), env=cluster.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    job_line = next(line for line in lines if line.startswith(f"job {job_id}"))
    assert "COMPLETED, restarts 0" in job_line
    assert f"checkpoint  step {STEPS} ({run_dir / 'checkpoints' / f'step-{STEPS:08d}'})" in lines
    tokens_per_s = last_record(run_dir)["tokens_per_s"]
    assert any(line.startswith(f"progress    step {STEPS}/{STEPS}") and f"{tokens_per_s:,.0f} tokens/s" in line
               for line in lines), proc.stdout
    evaluations = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    best = min(evaluations, key=lambda r: r["eval_loss"])
    assert [r["step"] for r in evaluations] == [0, STEPS]  # configs/gpt-tiny.yaml: every 100 steps, and the last
    assert (f"eval        last: step {STEPS}, loss {evaluations[-1]['eval_loss']:.4f} "
            f"(ppl {evaluations[-1]['eval_ppl']:.2f}); best: step {best['step']}, loss {best['eval_loss']:.4f}") in lines

    with open(run_dir / "slurm-jobs", "a") as jobs:  # a job neither slurmctld nor accounting knows
        jobs.write("987654 2026-01-01T00:00:00Z\n")
    proc = parallax("status", str(run_dir), env=cluster.env)
    assert "job 987654  unknown to SLURM" in proc.stdout, proc.stdout


def test_status_finds_the_checkpoints_of_a_run_launched_with_a_relative_run_dir(tmp_path):
    """logging.run_dir is often relative to where the run was launched; status is given the real path."""
    from launcher.config import load_config

    run_dir = tmp_path / "elsewhere" / "tiny"
    (run_dir / "checkpoints" / "step-00000010").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step-00000010")
    (run_dir / "config.yaml").write_text(load_config(REPO / TINY[0], ["logging.run_dir=runs/tiny"]).to_yaml())
    records = [{"step": 0, "eval_loss": 9.0, "eval_ppl": 8103.08}, {"step": 10, "loss": 7.5, "tokens_per_s": 1234.0,
               "step_seconds": 0.5}, {"step": 10, "eval_loss": 7.25, "eval_ppl": 1408.1}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    proc = parallax("status", str(run_dir))  # from the repository, where runs/tiny is not this run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint  step 10 ({run_dir / 'checkpoints' / 'step-00000010'})" in proc.stdout.splitlines(), proc.stdout
    assert "progress    step 10/300, loss 7.5000, 1,234 tokens/s" in proc.stdout, proc.stdout
    assert "eval        last: step 10, loss 7.2500 (ppl 1408.10); best: step 10, loss 7.2500" in proc.stdout, proc.stdout
