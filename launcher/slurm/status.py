"""`parallax status RUN_DIR`: the run's SLURM jobs and their states, its last checkpoint, its last logged step.

Job ids come from RUN_DIR/slurm-jobs (appended by `parallax submit`); states from slurmctld
(`scontrol show job`), or from accounting (`sacct`) once slurmctld has forgotten a finished job.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from launcher.config import ConfigError
from launcher.slurm.submit import JOBS_FILE
from parallel.checkpoint import LATEST, checkpoint_root


def add_status_command(commands) -> None:
    parser = commands.add_parser("status", help="a run's SLURM jobs, last checkpoint and last logged throughput")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (logging.run_dir)")
    parser.set_defaults(run=_run)


def _run(args) -> None:
    print(describe(Path(args.run_dir)))


def describe(run_dir: Path) -> str:
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist; pass a run's logging.run_dir")
    return "\n".join([f"run         {run_dir}", *_jobs(run_dir), _checkpoint(run_dir), _progress(run_dir)])


def _jobs(run_dir: Path) -> list[str]:
    path = run_dir / JOBS_FILE
    if not path.exists():
        return ["jobs        none submitted with `parallax submit`"]
    lines = []
    for entry in path.read_text().split("\n"):
        if entry.strip():
            job_id, submitted = entry.split()
            lines.append(f"job {job_id:<8}{job_state(job_id)} (submitted {submitted})")
    return lines


def job_state(job_id: str) -> str:
    """State, restarts and nodes (or why it waits) of a job, as slurmctld or accounting knows it."""
    proc = _run_quietly("scontrol", "show", "job", "--oneliner", job_id)
    if proc and proc.returncode == 0:
        fields = dict(word.partition("=")[::2] for word in proc.stdout.split() if "=" in word)
        state = fields.get("JobState", "?")
        where = f"on {fields['NodeList']}" if state == "RUNNING" else f"reason {fields.get('Reason', '?')}"
        if state == "PENDING" and fields.get("Restarts", "0") != "0":
            where += f", begins {fields.get('StartTime', '?')}"
        return f"{state}, restarts {fields.get('Restarts', '?')}, {where}, exit code {fields.get('ExitCode', '?')}"
    proc = _run_quietly("sacct", "--jobs", job_id, "--allocations", "--noheader", "--parsable2",
                        "--format=State,ExitCode,NodeList")
    if proc and proc.returncode == 0 and proc.stdout.strip():
        state, exit_code, nodes = proc.stdout.strip().splitlines()[-1].split("|")
        return f"{state} (from accounting), exit code {exit_code}, on {nodes}"
    return "unknown to SLURM (neither slurmctld nor accounting knows this job)"


def _run_quietly(*cmd: str):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _checkpoint(run_dir: Path) -> str:
    root = checkpoint_root(_saved_config(run_dir)) if (run_dir / "config.yaml").exists() else run_dir / "checkpoints"
    latest = root / LATEST
    if not latest.exists():
        return "checkpoint  none yet"
    name = latest.read_text().strip()
    return f"checkpoint  step {int(name.removeprefix('step-'))} ({root / name})"


def _progress(run_dir: Path) -> str:
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    if not lines:
        return "progress    no step logged yet"
    last = json.loads(lines[-1])
    total = _saved_config(run_dir).train.steps if (run_dir / "config.yaml").exists() else "?"
    return (f"progress    step {last['step']}/{total}, loss {last['loss']:.4f}, "
            f"{last['tokens_per_s']:,.0f} tokens/s, {last['step_seconds']:.3f} s/step (last logged step)")


def _saved_config(run_dir: Path):
    """The resolved config rank 0 wrote at start (checkpoint.dir may point outside the run directory)."""
    from launcher.config import RunConfig

    return RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
