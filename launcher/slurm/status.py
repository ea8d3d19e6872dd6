"""`parallax status RUN_DIR`: the run's SLURM jobs and their states (launcher/slurm/jobs.py), its
last checkpoint, its last logged step with its throughput, and its last and best validation loss."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from launcher.slurm.jobs import describe_job, recorded_jobs

# The config and the checkpoints (which import torch) are imported by the functions that use them,
# so that `parallax --help` and `parallax status --help` are instant.
if TYPE_CHECKING:
    from launcher.config import RunConfig


def add_status_command(commands) -> None:
    parser = commands.add_parser("status", help="a run's SLURM jobs, last checkpoint and last logged throughput")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (logging.run_dir)")
    parser.set_defaults(run=_run)


def _run(args) -> None:
    print(describe(Path(args.run_dir)))


def describe(run_dir: Path) -> str:
    from launcher.config import ConfigError, load_config

    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist; pass a run's logging.run_dir")
    # The resolved config rank 0 wrote at start (checkpoint.dir may point outside the run directory).
    cfg = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else None
    records = _records(run_dir)
    return "\n".join([f"run         {run_dir}", *_jobs(run_dir), _checkpoint(run_dir, cfg), _progress(records, cfg),
                      _evaluation(records)])


def _records(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl. A line that is not one (torn by a crash mid-write, garbled on disk) is
    skipped with one warning for all of them: the others still tell where the run is."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return []
    records, unreadable = [], 0
    for line in metrics.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            unreadable += 1
    if unreadable:
        print(f"parallax: warning: skipped {unreadable} unreadable line{'s' if unreadable > 1 else ''} of {metrics}",
              file=sys.stderr)
    return records


def _jobs(run_dir: Path) -> list[str]:
    jobs = recorded_jobs(run_dir)
    if not jobs:
        return ["jobs        none submitted with `parallax submit`"]
    return [f"job {job_id:<8}{describe_job(job_id)} (submitted {submitted})" for job_id, submitted in jobs]


def _checkpoint(run_dir: Path, cfg: Optional[RunConfig]) -> str:
    from parallel.checkpoint import checkpoints_newest_first

    # The default checkpoint directory is inside the run directory; its logging.run_dir may be
    # relative to wherever the run was launched, so find it from the RUN_DIR given here.
    root = Path(cfg.checkpoint.dir) if cfg and cfg.checkpoint.dir else run_dir / "checkpoints"
    committed = checkpoints_newest_first(root)
    if not committed:
        return "checkpoint  none yet"
    return f"checkpoint  step {int(committed[0].name.removeprefix('step-'))} ({committed[0]})"


def _progress(records: list[dict], cfg: Optional[RunConfig]) -> str:
    logged = [r for r in records if "tokens_per_s" in r]
    if not logged:
        return "progress    no step logged yet"
    last = logged[-1]
    total = cfg.train.steps if cfg else "?"
    return (f"progress    step {last['step']}/{total}, loss {last['loss']:.4f}, "
            f"{last['tokens_per_s']:,.0f} tokens/s, {last['step_seconds']:.3f} s/step (last logged step)")



def _evaluation(records: list[dict]) -> str:
    evaluations = [r for r in records if "eval_loss" in r]
    if not evaluations:
        return "eval        none yet (train.eval_interval)"
    last, best = evaluations[-1], min(evaluations, key=lambda r: r["eval_loss"])
    return (f"eval        last: step {last['step']}, loss {last['eval_loss']:.4f} (ppl {last['eval_ppl']:.2f}); "
            f"best: step {best['step']}, loss {best['eval_loss']:.4f}")
