"""What rank 0 tells the user and the run directory about the steps.

A live one-line progress bar on a terminal, plain log lines otherwise (SLURM output files, CI),
one JSON line per step in `metrics.jsonl` for tools and tests, and TensorBoard events
(launcher/tensorboard_log.py) from whichever ranks write them. The loop hands over the records of
every step since the last logging step at once; the last of them carries the throughput. An
evaluation is one more line, `{"step", "eval_loss", "eval_ppl", "eval_tokens", "eval_seconds"}`,
after the records of the step it follows (step 0: before the first).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


class RunLog:
    def __init__(self, run_dir: Path, total_steps: int, enabled: bool, tensorboard=None):
        self.total_steps, self.enabled, self.tensorboard = total_steps, enabled, tensorboard
        self.live = enabled and sys.stdout.isatty()
        self.started = time.perf_counter()
        metrics = run_dir / "metrics.jsonl"
        if enabled and (torn := _cut_torn_last_line(metrics)):
            self.say(f"warning: cut a torn last line ({torn} bytes) off {metrics}: a run stopped while writing it")
        self.metrics = open(metrics, "a") if enabled else None
        self.eval_seconds = 0.0

    def say(self, line: str) -> None:
        if self.enabled:
            print(f"parallax: {line}", flush=True)

    def write(self, records: list[dict]) -> None:
        if self.tensorboard:
            self.tensorboard.write(records)
        if not self.enabled:
            return
        self.metrics.write("".join(json.dumps(record) + "\n" for record in records))
        self.metrics.flush()
        record = records[-1]
        step = record["step"]
        line = (
            f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}  loss {_fmt(record['loss'], 4)}  "
            f"lr {record['lr']:.2e}  grad-norm {_fmt(record['grad_norm'])}  tokens/s {record['tokens_per_s']:,.0f}"
        )
        if self.live:
            done = int(30 * step / self.total_steps)
            end = "\n" if step == self.total_steps else ""
            print(f"\r[{'#' * done}{'.' * (30 - done)}] {line}", end=end, flush=True)
        else:
            print(line, flush=True)

    def evaluation(self, record: dict) -> None:
        self.eval_seconds += record["eval_seconds"]
        if self.tensorboard:
            self.tensorboard.evaluation(record)
        if not self.enabled:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        share = "" if record["step"] == 0 else \
            f"; evaluation is {self.eval_seconds / (time.perf_counter() - self.started):.1%} of the run so far"
        if "eval_segments" in record:  # data.fact_task: the answers, at eval_segments segments
            figures = (f"accuracy {record['eval_accuracy']:.1%} at {record['eval_segments']} segments  ({record['eval_tokens']:,} "
                       "answers")
        elif "eval_accuracy" in record:  # masked LM: the masked tokens
            figures = f"ppl {record['eval_ppl']:.2f}  accuracy {record['eval_accuracy']:.1%}  ({record['eval_tokens']:,} masked tokens"
        else:
            figures = f"ppl {record['eval_ppl']:.2f}  ({record['eval_tokens']:,} tokens"
        print(f"{chr(10) if self.live else ''}eval after step {record['step']}: loss {record['eval_loss']:.4f}  "
              f"{figures} in {record['eval_seconds']:.1f}s{share})", flush=True)

    def rollback(self, spike: dict, median: float, to_step: int, dropped: tuple[int, int]) -> None:
        """A loss spike's rollback (launcher/spikes.py): one line, and one record in metrics.jsonl, whose records
        of the steps after `to_step` the run then writes again."""
        if not self.enabled:
            return
        record = {"step": spike["step"], "spike_loss": spike["loss"], "spike_median": median,
                  "rolled_back_to": to_step, "dropped_batches": list(dropped)}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        print(f"{chr(10) if self.live else ''}parallax: loss spike at step {spike['step']}: {spike['loss']:.4f}, "
              f"{spike['loss'] / median:.1f}x the median {median:.4f}; rolled back to step {to_step}, dropping the "
              f"batches of steps {dropped[0]}-{dropped[1]}", flush=True)

    def close(self, summary: str) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.enabled:
            self.metrics.close()
            print(f"{summary} ({time.perf_counter() - self.started:.0f}s)", flush=True)


def _cut_torn_last_line(path: Path) -> int:
    """Cut off the end of `path` after its last newline, and say how many bytes that was: what a run
    that died mid-write left of its last record, which the next record appended would join into one
    line that no reader can parse."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        size = f.tell()
        f.seek(0)
        keep = f.read().rfind(b"\n") + 1  # the whole file is read only when it is torn
        f.truncate(keep)
    return size - keep


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
