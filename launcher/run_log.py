"""What rank 0 tells the user and the run directory about each step.

A live one-line progress bar on a terminal, plain log lines otherwise (SLURM output files, CI),
one JSON line per step in `metrics.jsonl` for tools and tests, and TensorBoard events
(launcher/tensorboard_log.py) from whichever ranks write them.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class RunLog:
    def __init__(self, run_dir: Path, total_steps: int, interval: int, enabled: bool, tensorboard=None):
        self.total_steps, self.interval, self.enabled, self.tensorboard = total_steps, interval, enabled, tensorboard
        self.live = enabled and sys.stdout.isatty()
        self.started = time.perf_counter()
        self.metrics = open(run_dir / "metrics.jsonl", "a") if enabled else None

    def step(self, record: dict) -> None:
        if self.tensorboard:
            self.tensorboard.step(record)
        if not self.enabled:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        step = record["step"]
        line = (
            f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}  loss {record['loss']:.4f}  "
            f"lr {record['lr']:.2e}  grad-norm {_fmt(record['grad_norm'])}  tokens/s {record['tokens_per_s']:,.0f}"
        )
        if self.live:
            done = int(30 * step / self.total_steps)
            end = "\n" if step == self.total_steps else ""
            print(f"\r[{'#' * done}{'.' * (30 - done)}] {line}", end=end, flush=True)
        elif step % self.interval == 0 or step in (1, self.total_steps):
            print(line, flush=True)

    def close(self, summary: str) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.enabled:
            self.metrics.close()
            print(f"{summary} ({time.perf_counter() - self.started:.0f}s)", flush=True)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
