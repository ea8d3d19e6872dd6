"""What the training-health guards cost: a step with and without them, on CPU at DP=2 (issue 29).

Two ranks train configs/gpt-tiny.yaml (ZeRO-0, fp32: the path where Parallax itself checks the gradient norm)
in alternating runs of the same steps: "guards" with the hang watchdog (train.hang_seconds), the straggler
report and loss-spike detection (train.spike, whose factor no step reaches), "bare" with the watchdog and spike
detection off and the straggler report replaced by one that does nothing. The non-finite check has no switch:
it is in both, and its own cost (one isfinite over the norm and its read on the host) is timed apart, against
the step. Target: the guards cost at most 1% of step time.

    PYTHONPATH=. .venv/bin/python bench/health.py [--steps 60] [--rounds 3]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class NoStragglerReport:
    """The straggler report's interface, doing nothing: the bare runs' stand-in."""

    def __init__(self, topo, factor):
        pass

    def begin_step(self):
        pass

    def end_step(self):
        pass

    def read(self):
        return {}, None


def step_seconds(records: list[dict]) -> float:
    """The median step time of the logging intervals after the first (which holds the warm-up)."""
    return statistics.median(r["step_seconds"] for r in records if "step_seconds" in r and r["step"] > 10)


def run(guards: bool, steps: int, run_dir: str) -> float:
    import launcher.train
    from launcher.config import load_config
    from launcher.stragglers import StragglerReport

    launcher.train.StragglerReport = StragglerReport if guards else NoStragglerReport
    overrides = [f"train.steps={steps}", "logging.interval=10", "checkpoint.interval=0", f"logging.run_dir={run_dir}",
                 "checkpoint.resume=none", "parallel.zero_stage=0", "train.eval_interval=0"]
    overrides += ["train.hang_seconds=600", "train.spike={factor: 1000, window: 5, skip: 1}"] if guards else \
        ["train.hang_seconds=0"]
    records = []
    launcher.train.train(load_config(REPO / "configs" / "gpt-tiny.yaml", overrides), records=records)
    return step_seconds(records)


def norm_check_seconds(repeats: int = 10_000) -> float:
    """The non-finite check as Parallax's ZeRO-0 fp32 path makes it, once per step."""
    import torch

    norm = torch.tensor(1.0)
    started = time.perf_counter()
    for _ in range(repeats):
        bool(torch.isfinite(norm).all())
    return (time.perf_counter() - started) / repeats


def rank_main(steps: int, rounds: int, out: str) -> None:
    import torch.distributed as dist

    timings = {True: [], False: []}
    for round_ in range(rounds):
        for guards in (round_ % 2 == 0, round_ % 2 == 1):  # alternate which goes first
            timings[guards].append(run(guards, steps, f"{out}/{'guards' if guards else 'bare'}-{round_}"))
    if dist.get_rank() == 0:
        guarded, bare = min(timings[True]), min(timings[False])
        check = norm_check_seconds()
        print(f"DP=2 on CPU, gpt-tiny, {steps} steps per run, best of {rounds} alternating runs")
        print(f"bare  : {bare * 1e3:8.2f} ms per step")
        print(f"guards: {guarded * 1e3:8.2f} ms per step  ({guarded / bare - 1:+.2%}; target <= +1%)")
        print(f"non-finite check (in both): {check * 1e6:.1f} us per step, {check / bare:.3%} of a step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help=argparse.SUPPRESS)  # the runs' directory, shared by the ranks
    args = parser.parse_args()
    if "RANK" in os.environ:
        rank_main(args.steps, args.rounds, args.out)
        return
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
                        f"--steps={args.steps}", f"--rounds={args.rounds}", f"--out={out}"], cwd=REPO, env=env,
                       check=True)


if __name__ == "__main__":
    main()
