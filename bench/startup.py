"""What a rank costs before its first step, side by side: time and peak RSS per rank.

    .venv/bin/python bench/startup.py [--layers 4] [--hidden 4256] [--tp 1 2] [--precision bf16] [--device cpu]
    bench/startup.py --device cuda --tp 1 --no-construction      # one GPU: the host RAM each method takes

Two comparisons, each job its own torchrun launch so that each process's peak RSS is its own:

- initialisation: models/init.py (each rank draws its slice, in the precision the run trains in)
  against megatron's `use_cpu_initialization` (each rank draws every full matrix in fp32 and keeps
  its slice), at each TP size, on a stack of `--layers` GPT blocks' weight matrices at T-NLG width
  (hidden 4256, MLP 4 x hidden: QKV and fc_in column-parallel, proj and fc_out row-parallel) built
  with megatron's own layers. The "sliced" ns/elem is the figure launcher/plan uses for its
  initialisation-time estimate.
- construction at DP=2: the GPT of that width and depth built and wrapped in its DeepSpeed engine by
  training's own code (launcher.train.build_model_and_engine) at ZeRO-1 and at ZeRO-3, which builds
  it partitioned under deepspeed.zero.Init.

Prints per rank (the worst rank) the seconds, the peak RSS (ru_maxrss) and the peak above the RSS
before building, then the ratios.
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
INIT_METHODS = ("megatron", "sliced")
ZERO_STAGES = ("zero1", "zero3")


def _stack(method: str, args, topo):
    """The weight matrices of `args.layers` blocks, drawn by `method`, std as in GPT (0.02, residual outputs scaled)."""
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig

    from launcher.config import load_config
    from models.init import initialise, layer_config, parallel_layer
    from parallel.engine import building_model

    hidden, layers, tp = args.hidden, args.layers, topo.tp
    column, row = tensor_parallel.ColumnParallelLinear, tensor_parallel.RowParallelLinear
    shapes = [(column, hidden, 3 * hidden, {"gather_output": False}), (row, hidden, hidden, {"input_is_parallel": True, "skip_bias_add": False}),
              (column, hidden, 4 * hidden, {"gather_output": False}), (row, 4 * hidden, hidden, {"input_is_parallel": True, "skip_bias_add": False})]
    stds = {column: 0.02, row: 0.02 / (2 * layers) ** 0.5}
    if method == "megatron":
        config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True)

        def layer(cls, n_in, n_out, kwargs):
            std = stds[cls]
            return cls(n_in, n_out, config=config, bias=False, init_method=lambda w: torch.nn.init.normal_(w, std=std), **kwargs)

        # drawn on the host, as megatron's use_cpu_initialization does, then moved to the device
        return torch.nn.ModuleList(layer(*shape) for _ in range(layers) for shape in shapes).to(args.device)
    with building_model(load_config(None, [f"train.precision={args.precision}"]), topo):
        stack = torch.nn.ModuleList(
            parallel_layer(cls, n_in, n_out, std=stds[cls], config=layer_config(tp), bias=False, **kwargs)
            for _ in range(layers) for cls, n_in, n_out, kwargs in shapes)
    initialise(stack, seed=1234)
    return stack


def _engine(stage: str, args, topo):
    """A GPT of the stack's width and depth and its engine, built as training builds them."""
    from launcher.config import load_config
    from launcher.train import build_model_and_engine

    cfg = load_config(None, [
        f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", "model.num_heads=32",
        "model.max_seq_len=64", "model.vocab_size=4096", "data.seq_len=64", f"train.precision={args.precision}",
        f"parallel.zero_stage={stage[-1]}"])
    model, _ = build_model_and_engine(cfg, topo, cfg.model.vocab_size, init_from=None)
    return model


def _rank(args) -> None:
    """One rank of one job: build, measure, write its figures."""
    import torch
    import torch.distributed as dist

    from parallel.topology import init_topology
    from parallel.zero3 import full_shape

    import launcher.train  # noqa: F401  imported by every job before its start RSS is read

    constructing = args.job in ZERO_STAGES
    topo = init_topology(tp=1 if constructing else int(os.environ["WORLD_SIZE"]))
    torch.manual_seed(1234)
    before = _rss_bytes()
    start = time.perf_counter()
    built = _engine(args.job, args, topo) if constructing else _stack(args.job, args, topo)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kept = sum(full_shape(p).numel() for p in built.parameters())
    result = {"seconds": seconds, "peak": peak, "peak_above_start": peak - before, "kept": kept}
    Path(args.out, f"{args.job}-{dist.get_world_size()}-rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _launch(job: str, ranks: int, args, out: str) -> dict:
    """Run `job` on `ranks` local ranks; its worst rank's figures."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                    __file__, "--job", job, "--out", out, "--layers", str(args.layers), "--hidden", str(args.hidden),
                    "--precision", args.precision, "--device", args.device],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks_figures = [json.loads(Path(out, f"{job}-{ranks}-rank{r}.json").read_text()) for r in range(ranks)]
    return {key: max(r[key] for r in ranks_figures) for key in ranks_figures[0]}


def _row(label: str, row: dict) -> str:
    return (f"  {label:14} {row['seconds']:8.2f} {1e9 * row['seconds'] / row['kept']:8.2f} "
            f"{row['peak'] / 2**30:9.2f} {row['peak_above_start'] / 2**30:12.2f}")


def _ratio(old: dict, new: dict) -> str:
    return (f"time {old['seconds'] / new['seconds']:.2f}x, peak RSS {old['peak'] / new['peak']:.2f}x, "
            f"peak above start {old['peak_above_start'] / new['peak_above_start']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=4256)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--construction", action=argparse.BooleanOptionalAction, default=True,
                        help="also build model and engine at DP=2 (two ranks, so not on one GPU)")
    parser.add_argument("--job", choices=INIT_METHODS + ZERO_STAGES, help=argparse.SUPPRESS)  # set on the ranks
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        return _rank(args)
    out = tempfile.mkdtemp(prefix="parallax-bench-startup-")
    header = f"  {'':14} {'seconds':>8} {'ns/elem':>8} {'peak GiB':>9} {'above start':>12}"
    print(f"{args.layers} layers, hidden {args.hidden}, {args.precision}, on {args.device}; per rank (worst rank)")
    print("initialisation (megatron: fp32 full matrices; sliced: this rank's slices in the run's precision):")
    print(header)
    init = {(method, tp): _launch(method, tp, args, out) for tp in args.tp for method in INIT_METHODS}
    for (method, tp), row in init.items():
        print(_row(f"{method} tp={tp}", row))
    if args.construction:
        print("construction of model and engine at DP=2:")
        print(header)
        built = {stage: _launch(stage, 2, args, out) for stage in ZERO_STAGES}
        for stage, row in built.items():
            print(_row(stage, row))
    print("ratios:")
    for tp in args.tp:
        print(f"  megatron / sliced at tp={tp}: {_ratio(init['megatron', tp], init['sliced', tp])}")
    if args.construction:
        print(f"  zero3 / zero1 at dp=2: peak RSS {built['zero3']['peak'] / built['zero1']['peak']:.2f}x, "
              f"peak above start {built['zero3']['peak_above_start'] / built['zero1']['peak_above_start']:.2f}x")


if __name__ == "__main__":
    main()
