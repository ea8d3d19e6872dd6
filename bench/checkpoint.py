"""Checkpoint throughput: a Parallax sharded save/load against torch.save/torch.load of the same tensors.

    .venv/bin/python bench/checkpoint.py [--nproc 2] [--layers 6] [--hidden 384] [--rounds 5]

Starts `--nproc` gloo ranks (ZeRO-1), takes two optimizer steps so Adam has state, then runs
alternating rounds of: one sharded save waited for until committed (a synchronous save: its
throughput, and what the loop was blocked for before saves ran in the background); the same save
as the training loop makes it, timed only until `save()` returns (the loop's blocked time; the
background write is then waited for, untimed); rank 0's torch.save of the very same tensors (fp32
masters and both Adam moments, every parameter); torch.save followed by fsync (a Parallax save is
durable; torch.save alone leaves the data in the page cache); one resume into the same engine
(manifest verification included) and one torch.load. keep=1, so each save also renames the
previous checkpoint away; its background deletion finishes before the next measurement starts.
The two saves of a round hold the same numbers, and their shards must be byte for byte the same.
Medians are printed. Files go to --dir (default: a temporary directory); the page cache is warm for
reads, and dirty pages are written back before each measurement so none pays for another's write-back.

Then what a load reads of the shards' fp32 fragments (`Resumed.tensor_bytes_read`: the checksum blocks it
checks, read whole, which hold every byte it copies out; no shard is checked whole), per rank: at the
saved layout against the rank's own shard's fragments, and, in a second launch of twice as many ranks,
at twice the DP size against its share of the checkpoint's fragments. Blocks are the default 1 MiB.
"""
from __future__ import annotations

import argparse
import os
import statistics
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


def _config(args, *overrides: str):
    from launcher.config import load_config

    return load_config(None, [
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", "model.num_heads=4",
        "model.vocab_size=8192", "model.max_seq_len=64", "data.seq_len=64", "train.micro_batch_size=2",
        "parallel.zero_stage=1", f"logging.run_dir={args.dir}", *overrides,
    ])


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

    from parallel.checkpoint import Checkpointer, fragment_bytes, read_manifest, read_tensors, step_dir_name
    from parallel.checkpoint.storage import shard_file_name

    cfg = _config(args, "checkpoint.resume=none", "checkpoint.keep=1")
    topo, engine = _engine(cfg)
    tokens = torch.randint(0, 8192, (2, 65))
    for _ in range(2):
        engine.backward(engine(tokens[:, :-1], tokens[:, 1:]))
        engine.step()
    checkpointer = Checkpointer(cfg, topo, engine, _NoData())
    checkpointer.save(1, 0).wait()
    tensors = read_tensors(checkpointer.root / step_dir_name(1)) if topo.rank == 0 else None
    baseline = Path(args.dir) / "torch-save.pt"

    def timed(action) -> float:
        while any(checkpointer.root.glob(".step-*.pruned.tmp")):  # a save's pruning thread deletes the old one
            time.sleep(0.01)
        os.sync()  # each measurement starts with no dirty pages of another one waiting to be written back
        dist.barrier()
        started = time.perf_counter()
        action()
        dist.barrier()
        return time.perf_counter() - started

    def torch_save_and_fsync():
        torch.save(tensors, baseline)
        with open(baseline, "rb") as f:
            os.fsync(f.fileno())

    def shard_entries(step: int) -> dict:
        """The shards' sizes and crc32s: the same numbers saved twice must give the same bytes."""
        files = read_manifest(checkpointer.root / step_dir_name(step))["files"]
        return {name: entry for name, entry in files.items() if name.startswith("shard-")}

    # Rounds alternate the two systems, so a burst of disk write-back or another job's load hits both.
    times = {"save": [], "blocked": [], "torch.save": [], "torch.save+fsync": [], "load": [], "torch.load": []}
    resumes = []
    for round_ in range(args.rounds):
        synchronous, step = 2 + 2 * round_, 3 + 2 * round_
        times["save"].append(timed(lambda: checkpointer.save(synchronous, 0).wait()))  # also prunes (keep=1)
        written = shard_entries(synchronous)
        pending = []
        times["blocked"].append(timed(lambda: pending.append(checkpointer.save(step, 0))))
        assert pending[0].wait() is None
        assert shard_entries(step) == written, "the background save wrote other bytes than the synchronous one"
        times["torch.save"].append(timed(lambda: topo.rank == 0 and torch.save(tensors, baseline)))
        times["torch.save+fsync"].append(timed(lambda: topo.rank == 0 and torch_save_and_fsync()))
        path = checkpointer.root / step_dir_name(step)
        resume_cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"resume": str(path)})})
        times["load"].append(timed(lambda: resumes.append(Checkpointer(resume_cfg, topo, engine, _NoData()).resume())))
        times["torch.load"].append(timed(lambda: topo.rank == 0 and torch.load(baseline, weights_only=True)))
    own = fragment_bytes(torch.load(path / shard_file_name(topo.rank), mmap=True, weights_only=True))
    reads = [None] * topo.world_size
    dist.all_gather_object(reads, (resumes[-1].tensor_bytes_read, own))
    (Path(args.dir) / "latest-checkpoint").write_text(str(path))
    if topo.rank != 0:
        return

    sharded_mb = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    torch_mb = baseline.stat().st_size / 1e6
    rate = {name: (sharded_mb if name in ("save", "load") else torch_mb) / statistics.median(seconds)
            for name, seconds in times.items() if name != "blocked"}
    print(f"checkpoint of {sum(t['param'].numel() for t in tensors.values()) / 1e6:.1f}M parameters "
          f"({sharded_mb:.0f} MB: fp32 masters + Adam moments) on {topo.world_size} ranks, zero=1; "
          f"median of {args.rounds} alternating rounds, page cache warm")
    print(f"  sharded save  {rate['save']:7.0f} MB/s   torch.save {rate['torch.save']:7.0f} MB/s   "
          f"ratio {rate['save'] / rate['torch.save']:.2f}x   (target >= 0.8x)")
    print(f"  {'':27}torch.save+fsync {rate['torch.save+fsync']:7.0f} MB/s   "
          f"ratio {rate['save'] / rate['torch.save+fsync']:.2f}x   (a Parallax save is fsynced and checksummed)")
    print(f"  sharded load  {rate['load']:7.0f} MB/s   torch.load {rate['torch.load']:7.0f} MB/s   "
          f"ratio {rate['load'] / rate['torch.load']:.2f}x   (load includes checksum verification)")
    print(f"  training loop blocked by a save: {statistics.median(times['blocked']):.3f} s in the background "
          f"(target <= 0.05 s), {statistics.median(times['save']):.3f} s synchronous (medians); the same shard bytes")
    print("  a load at the saved layout reads (to copy or verify), per rank, of its own shard's fragment bytes: "
          + ", ".join(f"{read / own:.3f}x ({read:,} B)" for read, own in reads) + "  (target <= 1.05x)")


def _resume_at_more_ranks(args) -> None:
    """A second launch, of more ranks: resume the save job's last checkpoint at this DP size and report
    what each rank read against its even share of the checkpoint's fragments."""
    import torch.distributed as dist

    from parallel.checkpoint import Checkpointer, fragment_bytes, load_shards, read_manifest

    path = Path((Path(args.dir) / "latest-checkpoint").read_text())
    cfg = _config(args, f"checkpoint.resume={path}")
    topo, engine = _engine(cfg)
    read = Checkpointer(cfg, topo, engine, _NoData()).resume().tensor_bytes_read
    reads = [None] * topo.world_size
    dist.all_gather_object(reads, read)
    if topo.rank == 0:
        shards = load_shards(path, read_manifest(path)).values()
        share = sum(fragment_bytes(shard) for shard in shards) / topo.world_size
        print(f"  a load at DP={topo.dp} of that DP={topo.dp // 2} checkpoint reads (to copy or verify), per rank, "
              f"of 1/{topo.dp} of its fragment bytes: " + ", ".join(f"{r / share:.3f}x" for r in reads)
              + "  (target <= 1.05x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--rank-main", choices=["save", "resume"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        return _rank_main(args) if args.rank_main == "save" else _resume_at_more_ranks(args)
    with tempfile.TemporaryDirectory() as tmp:
        for job, nproc in (("save", args.nproc), ("resume", 2 * args.nproc)):
            env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu",
                   "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   __file__, f"--rank-main={job}", f"--layers={args.layers}", f"--hidden={args.hidden}",
                   f"--rounds={args.rounds}", f"--dir={args.dir or tmp}"]
            if subprocess.run(cmd, env=env).returncode:
                sys.exit(1)


if __name__ == "__main__":
    main()
