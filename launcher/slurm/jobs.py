"""A run's SLURM jobs: the ids `parallax submit` recorded in RUN_DIR/slurm-jobs, and what SLURM says of each.

States come from slurmctld (`scontrol show job`), or from accounting (`sacct`) once slurmctld has
forgotten a finished job (MinJobAge); a cluster without accounting then knows nothing of it.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Optional

JOBS_FILE = "slurm-jobs"
# States of a job that will still run (again) and write to its run directory.
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT"}


def record_job(run_dir: Path, job_id: str) -> None:
    with open(run_dir / JOBS_FILE, "a") as jobs:
        jobs.write(f"{job_id} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")


def recorded_jobs(run_dir: Path) -> list[tuple[str, str]]:
    """(job id, submission time) of every job submitted for this run, oldest first."""
    path = run_dir / JOBS_FILE
    lines = path.read_text().splitlines() if path.exists() else []
    return [tuple(line.split()) for line in lines if line.strip()]


def job_fields(job_id: str) -> Optional[dict[str, str]]:
    """`scontrol show job` as a dict (JobState, Restarts, NodeList, Reason, ...), or None if slurmctld does not know it."""
    proc = _quietly("scontrol", "show", "job", "--oneliner", job_id)
    if proc is None or proc.returncode:
        return None
    return dict(word.partition("=")[::2] for word in proc.stdout.split() if "=" in word)


def describe_job(job_id: str) -> str:
    """State, restarts and nodes (or why it waits) of a job, as slurmctld or accounting knows it."""
    fields = job_fields(job_id)
    if fields is not None:
        state = fields.get("JobState", "?")
        where = f"on {fields['NodeList']}" if state == "RUNNING" else f"reason {fields.get('Reason', '?')}"
        if state == "PENDING" and fields.get("Restarts", "0") != "0":
            where += f", begins {fields.get('StartTime', '?')}"
        return f"{state}, restarts {fields.get('Restarts', '?')}, {where}, exit code {fields.get('ExitCode', '?')}"
    proc = _quietly("sacct", "--jobs", job_id, "--allocations", "--noheader", "--parsable2",
                    "--format=State,ExitCode,NodeList")
    if proc is not None and proc.returncode == 0 and proc.stdout.strip():
        state, exit_code, nodes = proc.stdout.strip().splitlines()[-1].split("|")
        return f"{state} (from accounting), exit code {exit_code}, on {nodes}"
    return "unknown to SLURM (neither slurmctld nor accounting knows this job)"


def active_job(run_dir: Path) -> Optional[tuple[str, str]]:
    """(job id, state) of a recorded job that is queued or running, if any."""
    for job_id, _ in recorded_jobs(run_dir):
        fields = job_fields(job_id)
        if fields is not None and fields.get("JobState") in ACTIVE_STATES:
            return job_id, fields["JobState"]
    return None


def _quietly(*cmd: str) -> Optional[subprocess.CompletedProcess]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
