"""Pipeline efficiency on CPU: measured PP=2 step times against the bubble model, 1F1B and interleaved.

    .venv/bin/python bench/pipeline.py [--layers 8] [--hidden 256] [--seq-len 128] [--micro-batch 4] [--steps 8]

Two launches of gloo ranks, one core each (OMP_NUM_THREADS=1):
- one rank, no pipeline (PP=1): the step time of m = 1, 2, 4, 8 micro-batches, the reference;
- two ranks, PP=2, 1F1B: the same steps of the same model; and interleaved 1F1B with 2 virtual stages at m = 4.
Every step is the same global work (m micro-batches of --micro-batch sequences, forward, backward, global-norm
clip and AdamW at ZeRO-1, fp32). Within a launch each layout has its own engine, built as the training loop
builds it (launcher/train.py's build_model_and_engine and step_runner), and steps are interleaved round by
round in rotating order, so load from other processes hits all of them alike. A step is timed between two
barriers; the median of --steps steps after --warmup rounds is taken.

Efficiency = (one-rank time / p) / PP time: 1 when p ranks split the work with no idle time and no cost of
their own. The 1F1B schedule idles (p - 1) / (m + p - 1) of a step, so the model is m / (m + p - 1), and
v x m / (v x m + p - 1) interleaved. The gap between measured and model is what the bubble model leaves
out: point-to-point messages (gloo over loopback TCP), the per-step fixed costs (optimizer step, the
norm reduction), and any imbalance between the stages (the first holds the embedding, the last the head
and loss). The default model is sized so that a micro-batch's compute dwarfs its messages.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512  # small, so that the head on the last stage weighs little against the blocks
PP = 2
MICRO_BATCHES = (1, 2, 4, 8)
INTERLEAVED = (2, 4)  # (virtual stages, micro-batches)


def _config(args, pp: int, virtual_stages: int, micro_batches: int):
    from launcher.config import load_config

    return load_config(None, [
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", "model.num_heads=4",
        f"model.max_seq_len={args.seq_len}", f"model.vocab_size={VOCAB}", f"data.seq_len={args.seq_len}",
        f"train.micro_batch_size={args.micro_batch}", f"train.grad_accum={micro_batches}", "train.precision=fp32",
        f"parallel.pp={pp}", f"parallel.virtual_stages={virtual_stages}", "parallel.zero_stage=1",
        "logging.run_dir=/tmp/parallax-bench-pipeline",
    ])


def _layouts(world_size: int) -> dict[str, tuple[int, int, int]]:
    """name -> (pp, virtual stages, micro-batches) of the layouts this launch times."""
    if world_size == 1:
        return {f"m={m}": (1, 1, m) for m in MICRO_BATCHES}
    v, m = INTERLEAVED
    return {**{f"m={m}": (PP, 1, m) for m in MICRO_BATCHES}, f"interleaved m={m}": (PP, v, m)}


def _rank_main(args) -> None:
    import torch
    import torch.distributed as dist

    from launcher.train import build_model_and_engine
    from parallel.pipeline import step_runner
    from parallel.topology import init_topology

    world_size = int(os.environ["WORLD_SIZE"])
    topo = init_topology(tp=1, pp=1 if world_size == 1 else PP)
    tokens = torch.randint(0, VOCAB, (max(MICRO_BATCHES), args.micro_batch, args.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))
    steps = {}  # name -> (runner, the micro-batches it is handed)
    for name, (pp, virtual_stages, m) in _layouts(world_size).items():
        cfg = _config(args, pp, virtual_stages, m)
        torch.manual_seed(cfg.train.seed)
        model, engine = build_model_and_engine(cfg, topo, VOCAB, init_from=None)
        batches = [model.batch_inputs(tokens[i]) for i in range(m)] if topo.reads_batches else []
        steps[name] = (step_runner(engine, cfg, topo), batches)
    torch.set_num_threads(1)  # after set-up, in case a library changed it

    wall, cpu = {name: [] for name in steps}, {name: [] for name in steps}
    names = list(steps)
    for round_ in range(args.warmup + args.steps):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            runner, batches = steps[name]
            dist.barrier()
            started, started_cpu = time.perf_counter(), time.process_time()
            runner.train_step(batches)
            dist.barrier()
            if round_ >= args.warmup:
                wall[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - started_cpu)
    ranks_cpu = [None] * world_size
    dist.all_gather_object(ranks_cpu, {name: statistics.median(seconds) for name, seconds in cpu.items()})
    if topo.rank == 0:
        Path(args.out).write_text(json.dumps({name: {"wall": statistics.median(wall[name]),
                                                     "cpu": sum(rank[name] for rank in ranks_cpu)} for name in steps}))


def _launch(args, nproc: int, out: Path) -> dict[str, dict[str, float]]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__,
           "--rank-main", f"--out={out}", *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                            if k not in ("rank_main", "out"))]
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode:
        sys.exit(f"bench/pipeline.py: the {nproc}-rank launch failed")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per layout, after the warm-up rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        return _rank_main(args)

    started, load = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        one_rank = _launch(args, 1, Path(tmp) / "one-rank.json")
        pipeline = _launch(args, PP, Path(tmp) / "pipeline.json")
    print(f"PP={PP} on {PP} gloo ranks against one rank, OMP_NUM_THREADS=1 each; GPT {args.layers} layers x "
          f"{args.hidden} hidden, vocab {VOCAB}, micro-batch {args.micro_batch}x{args.seq_len}, fp32, ZeRO-1; "
          f"medians of {args.steps} steps after {args.warmup} warm-up rounds")
    print(f"{'schedule':16}{'m':>3}{'one rank ms':>13}{'PP ms':>8}{'efficiency':>12}{'model':>7}"
          f"{'measured/model':>16}{'PP cpu/one rank cpu':>21}")
    efficiency, model = {}, {}
    for name, pp in pipeline.items():
        v, m = INTERLEAVED if name.startswith("interleaved") else (1, int(name.split("=")[1]))
        reference = one_rank[f"m={m}"]
        efficiency[name] = reference["wall"] / PP / pp["wall"]
        model[name] = v * m / (v * m + PP - 1)
        print(f"{'1f1b' if v == 1 else f'interleaved v={v}':16}{m:>3}{reference['wall'] * 1e3:13.0f}"
              f"{pp['wall'] * 1e3:8.0f}{efficiency[name]:12.3f}{model[name]:7.3f}"
              f"{efficiency[name] / model[name]:16.3f}{pp['cpu'] / reference['cpu']:21.3f}")
    m = max(MICRO_BATCHES)
    ratio = efficiency[f"m={m}"] / model[f"m={m}"]
    print(f"1f1b at m={m}: the measured efficiency is {ratio:.1%} of the model's: "
          f"{'within' if abs(1 - ratio) <= 0.15 else 'NOT within'} 15% (target)")
    v, m = INTERLEAVED
    interleaved, plain = efficiency[f"interleaved m={m}"], efficiency[f"m={m}"]
    print(f"interleaved v={v} at m={m}: efficiency {interleaved:.3f} against 1f1b's {plain:.3f} (model "
          f"{model[f'interleaved m={m}']:.3f} against {model[f'm={m}']:.3f}): "
          f"{'a smaller' if interleaved > plain else 'NOT a smaller'} bubble")
    print(f"{time.perf_counter() - started:.0f} s in all; load average {load:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after (on {os.cpu_count()} cores)")

if __name__ == "__main__":
    main()
