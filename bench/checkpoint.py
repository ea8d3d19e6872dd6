"""Checkpoint throughput: a Parallax sharded save/load against torch.save/torch.load of the same tensors.

    .venv/bin/python bench/checkpoint.py [--nproc 2] [--layers 6] [--hidden 384]

Starts `--nproc` gloo ranks (ZeRO-1), takes two optimizer steps so Adam has state, then times one
sharded save -- the time the training loop is blocked, since saving is synchronous -- and one
resume into a fresh engine (manifest verification included). Rank 0 then writes and reads the very
same tensors (fp32 masters and both Adam moments, every parameter) with one torch.save and one
torch.load. Files go to --dir (default: a temporary directory); the OS page cache is warm for both.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class _NoData:
    """The checkpointer saves the batch source's state; this benchmark has no batches worth saving."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, states: list[dict]) -> None:
        pass


def _engine(cfg):
    import torch

    from models.gpt import GPT
    from parallel.engine import build_engine
    from parallel.topology import init_topology

    topo = init_topology(tp=cfg.parallel.tp)
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(GPT(cfg.model, cfg.model.vocab_size), cfg, topo)
    return topo, engine


def _rank_main(args) -> None:
    import torch
    import torch.distributed as dist

    from launcher.config import load_config
    from parallel.checkpoint import Checkpointer, read_tensors, step_dir_name

    cfg = load_config(None, [
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", "model.num_heads=4",
        "model.vocab_size=8192", "model.max_seq_len=64", "data.seq_len=64", "train.micro_batch_size=2",
        "parallel.zero_stage=1", f"logging.run_dir={args.dir}", "checkpoint.resume=none", "checkpoint.keep=1",
    ])
    topo, engine = _engine(cfg)
    tokens = torch.randint(0, 8192, (2, 65))
    for _ in range(2):
        engine.backward(engine(tokens[:, :-1], tokens[:, 1:]))
        engine.step()
    checkpointer = Checkpointer(cfg, topo, engine, _NoData())
    dist.barrier()
    started = time.perf_counter()
    checkpointer.save(2, 0)
    save_seconds = time.perf_counter() - started

    path = checkpointer.root / step_dir_name(2)
    cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"resume": str(path)})})
    topo, engine = _engine(cfg)
    dist.barrier()
    started = time.perf_counter()
    Checkpointer(cfg, topo, engine, _NoData()).resume()
    load_seconds = time.perf_counter() - started
    if topo.rank != 0:
        return

    sharded_mb = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    tensors = read_tensors(path)
    baseline = Path(args.dir) / "torch-save.pt"
    started = time.perf_counter()
    torch.save(tensors, baseline)
    torch_save_seconds = time.perf_counter() - started
    started = time.perf_counter()
    torch.load(baseline, weights_only=True)
    torch_load_seconds = time.perf_counter() - started
    torch_mb = baseline.stat().st_size / 1e6

    save_rate, load_rate = sharded_mb / save_seconds, sharded_mb / load_seconds
    torch_save_rate, torch_load_rate = torch_mb / torch_save_seconds, torch_mb / torch_load_seconds
    print(f"checkpoint of {sum(t['param'].numel() for t in tensors.values()) / 1e6:.1f}M parameters "
          f"({sharded_mb:.0f} MB: fp32 masters + Adam moments) on {topo.world_size} ranks, zero=1")
    print(f"  sharded save  {save_rate:7.0f} MB/s   torch.save {torch_save_rate:7.0f} MB/s   "
          f"ratio {save_rate / torch_save_rate:.2f}x")
    print(f"  sharded load  {load_rate:7.0f} MB/s   torch.load {torch_load_rate:7.0f} MB/s   "
          f"ratio {load_rate / torch_load_rate:.2f}x  (load includes checksum verification)")
    print(f"  training loop blocked by the save: {save_seconds:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        return _rank_main(args)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu",
               "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.nproc))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               __file__, "--rank-main", f"--layers={args.layers}", f"--hidden={args.hidden}", f"--dir={args.dir or tmp}"]
        sys.exit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
