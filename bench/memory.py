"""Recurrent memory on the built-in long-context task (issue 26): accuracy by input length, memory and time.

    python bench/memory.py                      # 3 seeds, 2 at a time, the curve out to 1,024 segments
    python bench/memory.py --seeds 4 --jobs 1   # one seed

Trains configs/rmt-fact-tiny.yaml (2 layers, hidden 128, 8 memory tokens, segments of 32 tokens, the
curriculum 1 -> 4 segments) once per seed, and the same model without memory, which sees its window (the last
segment) and so only the question. Then, side by side in one table, `parallax eval --segments 1,2,4,...,1024`
of every run: the answer's accuracy at each length. Last, one seed's checkpoint reads 1,024 segments in one
process while the peak resident memory (VmHWM) and the clock are read after every segment: memory flat from
segment 16 on and time linear in the segments is what reading a segment at a time promises. Runs go under
runs/bench-memory/; the figures are printed and written to runs/bench-memory/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "rmt-fact-tiny.yaml"
PARALLAX = [sys.executable, "-m", "launcher.cli"]
BASELINE_STEPS = 600  # a model that cannot see the fact learns the question's form and the answers' prior fast


def train(name: str, overrides: list[str], root: Path, threads: int) -> dict:
    run_dir = root / name
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([*PARALLAX, "train", str(CONFIG), *overrides, f"logging.run_dir={run_dir}",
                    "checkpoint.resume=none", "train.eval_interval=0"], check=True, cwd=REPO, env=env,
                   stdout=subprocess.DEVNULL)
    return {"name": name, "run_dir": str(run_dir), "train_minutes": (time.perf_counter() - started) / 60}


def curve(run: dict, counts: list[int], samples: int, threads: int) -> dict[int, float]:
    out = Path(run["run_dir"]) / "curve.json"
    subprocess.run([*PARALLAX, "eval", run["run_dir"], "--segments", ",".join(map(str, counts)), "--samples",
                    str(samples), "--out", str(out)], check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return {c["segments"]: c["accuracy"] for c in json.loads(out.read_text())["by_segments"]}


def trace(run_dir: str, segments: int, samples: int) -> dict:
    """In this process: the run's checkpoint reads `segments` segments; VmHWM and the clock after each."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
    sys.path.insert(0, str(REPO))
    from launcher.config import load_config
    from launcher.evaluate import evaluate_checkpoint

    cfg = load_config(Path(run_dir) / "config.yaml", [
        f"checkpoint.resume={Path(run_dir) / 'checkpoints'}", f"data.fact_task.eval_segments=[{segments}]",
        f"data.fact_task.eval_samples={samples}"])
    peak, clock = [], []

    def on_segment(count: int, segment: int) -> None:
        clock.append(time.perf_counter())
        peak.append(_vm_hwm_kib())

    evaluate_checkpoint(cfg, Path(run_dir) / "trace-eval.json", on_segment=on_segment)
    return {"peak_kib": peak, "seconds": [t - clock[0] for t in clock]}


def _vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once (each gets cores / jobs threads)")
    parser.add_argument("--samples", type=int, default=200, help="held-out samples per length")
    parser.add_argument("--longest", type=int, default=1024)
    parser.add_argument("--trace", metavar="RUN", help=argparse.SUPPRESS)  # the child process of the trace
    args = parser.parse_args()
    if args.trace:
        print(json.dumps(trace(args.trace, args.longest, args.samples)))
        return
    root = REPO / "runs" / "bench-memory"
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(f"seed-{seed}", [f"train.seed={seed}"]) for seed in seeds]
    jobs.append(("no-memory", ["model.memory=null", "data.seq_len=32", f"train.steps={BASELINE_STEPS}"]))
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda job: train(*job, root, threads), jobs))
    counts = [2 ** k for k in range(args.longest.bit_length()) if 2 ** k <= args.longest]
    with ThreadPoolExecutor(args.jobs) as pool:
        accuracy = list(pool.map(lambda run: curve(run, counts, args.samples, threads), runs))
    traced = json.loads(subprocess.run(
        [sys.executable, __file__, "--trace", runs[0]["run_dir"], "--longest", str(args.longest), "--samples",
         str(min(args.samples, 32))], check=True, capture_output=True, text=True, cwd=REPO).stdout.splitlines()[-1])

    names = [run["name"] for run in runs]
    print(f"\naccuracy of the answer (chance {1 / 10:.0%}), {args.samples} held-out samples per length")
    print(f"{'segments':>9} {'tokens':>8} " + " ".join(f"{name:>10}" for name in names))
    for count in counts:
        print(f"{count:>9} {count * 32:>8} " + " ".join(f"{acc[count]:>10.1%}" for acc in accuracy))
    print("training minutes: " + ", ".join(f"{run['name']} {run['train_minutes']:.1f}" for run in runs))
    peak, seconds = traced["peak_kib"], traced["seconds"]
    flat = max(peak[15:]) / peak[15] - 1
    half = len(seconds) // 2
    per_segment_first, per_segment_second = (seconds[half] - seconds[15]) / (half - 15), \
        (seconds[-1] - seconds[half]) / (len(seconds) - 1 - half)
    print(f"reading {len(peak)} segments ({names[0]}): peak memory {peak[15] / 1024:.1f} MiB at segment 16, "
          f"{max(peak[15:]) / 1024:.1f} MiB at most after it (+{flat:.2%}); seconds per segment "
          f"{per_segment_first * 1e3:.2f} ms in segments 16-{half}, {per_segment_second * 1e3:.2f} ms in "
          f"{half}-{len(seconds)} (ratio {per_segment_second / per_segment_first:.3f})")
    results = {"runs": runs, "accuracy": dict(zip(names, accuracy)), "trace": {
        "peak_kib": peak, "seconds": seconds, "flat_from_16": flat,
        "per_segment_ratio": per_segment_second / per_segment_first}}
    (root / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
