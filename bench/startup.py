"""Initialisation cost per rank: models/init.py (each rank draws its slice) against megatron's
`use_cpu_initialization` (each rank draws every full matrix and keeps its slice), side by side.

    .venv/bin/python bench/init.py [--layers 2] [--hidden 4256] [--tp 1 2] [--device cpu]

Builds a stack of `--layers` GPT blocks' weight matrices at T-NLG width (hidden 4256, MLP 4 x hidden:
QKV and fc_in column-parallel, proj and fc_out row-parallel) with megatron's own layers, both
ways, at each TP size: one torchrun job per (method, TP), so each process's peak RSS is its own.
Prints per rank the seconds spent building, the peak RSS (ru_maxrss) and the peak above the RSS
before building, and the nanoseconds per element this rank kept, which is the figure
launcher/plan uses for its initialisation-time estimate.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("megatron", "sliced")


def _stack(method: str, layers: int, hidden: int, tp: int, device: str):
    """The weight matrices of `layers` blocks, drawn by `method`, std as in GPT (0.02, residual outputs scaled)."""
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig

    from models.init import initialise, layer_config, parallel_layer

    column, row = tensor_parallel.ColumnParallelLinear, tensor_parallel.RowParallelLinear
    shapes = [(column, hidden, 3 * hidden, {"gather_output": False}), (row, hidden, hidden, {"input_is_parallel": True, "skip_bias_add": False}),
              (column, hidden, 4 * hidden, {"gather_output": False}), (row, 4 * hidden, hidden, {"input_is_parallel": True, "skip_bias_add": False})]
    stds = {column: 0.02, row: 0.02 / (2 * layers) ** 0.5}
    old_config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True)

    def layer(cls, n_in, n_out, kwargs):
        if method == "megatron":
            std = stds[cls]
            return cls(n_in, n_out, config=old_config, bias=False,
                       init_method=lambda w: torch.nn.init.normal_(w, std=std), **kwargs)
        return parallel_layer(cls, n_in, n_out, std=stds[cls], config=layer_config(tp), bias=False, **kwargs)

    with torch.device(device):
        stack = torch.nn.ModuleList(layer(*shape) for _ in range(layers) for shape in shapes)
        if method == "sliced":
            initialise(stack, seed=1234)
    return stack


def _rank(args) -> None:
    """One rank of one (method, TP) job: build, measure, write its figures."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    if args.device == "cuda":
        torch.cuda.synchronize()
    before = _rss_bytes()
    start = time.perf_counter()
    stack = _stack(args.method, args.layers, args.hidden, dist.get_world_size(), args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kept = sum(p.numel() for p in stack.parameters())
    result = {"seconds": seconds, "peak": peak, "peak_above_start": peak - before, "kept": kept}
    Path(args.out, f"{args.method}-tp{dist.get_world_size()}-rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4256)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # set on the ranks this starts
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        return _rank(args)
    out = tempfile.mkdtemp(prefix="parallax-bench-init-")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for tp in args.tp:
        for method in METHODS:
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}",
                            __file__, "--method", method, "--out", out, "--layers", str(args.layers),
                            "--hidden", str(args.hidden), "--device", args.device],
                           env=env, check=True, stdout=subprocess.DEVNULL)
    print(f"{args.layers} layers, hidden {args.hidden}, on {args.device}; per rank (worst rank):")
    print(f"  {'method':9} {'tp':>3} {'seconds':>8} {'ns/elem':>8} {'peak GiB':>9} {'above start':>12}")
    rows = {}
    for tp in args.tp:
        for method in METHODS:
            ranks = [json.loads(Path(out, f"{method}-tp{tp}-rank{r}.json").read_text()) for r in range(tp)]
            row = {key: max(r[key] for r in ranks) for key in ranks[0]}
            rows[method, tp] = row
            print(f"  {method:9} {tp:3} {row['seconds']:8.2f} {1e9 * row['seconds'] / row['kept']:8.2f} "
                  f"{row['peak'] / 2**30:9.2f} {row['peak_above_start'] / 2**30:12.2f}")
    print("ratios, megatron / sliced:")
    for tp in args.tp:
        old, new = rows["megatron", tp], rows["sliced", tp]
        print(f"  tp={tp}: time {old['seconds'] / new['seconds']:.2f}x, peak RSS {old['peak'] / new['peak']:.2f}x, "
              f"peak above start {old['peak_above_start'] / new['peak_above_start']:.2f}x")


if __name__ == "__main__":
    main()
