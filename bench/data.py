"""Tokens per second the data pipeline delivers to one rank, against a bare read-and-tokenize loop.

Both read the same shard files (the built-in stdlib corpus unless --source is
given) with the same tokenizer, in one run, so the difference is the pipeline's
whole cost: `datasets` streaming, shuffling, packing, batching, state tracking
and the hand-off from the worker process. Target: the pipeline costs at most 20%
more than the bare loop.

Two measures, best of alternating rounds:
- wall-clock tokens/s, steady state after the first batch (start-up is shown apart);
- CPU seconds per million tokens, all processes included (the workers are
  joined before reading it), which is what "cost" means on a machine whose other
  load makes wall-clock figures swing.

    PYTHONPATH=. .venv/bin/python bench/data.py [--tokens 2000000] [--rounds 3] [--num-workers 1]

With --tokenize it times `parallax tokenize` (data_pipeline/offline_tokenize.py) instead, whole runs on the
same shards with 1 and with 2 workers, best of alternating rounds. Target: 2 workers at least 1.6x as fast as 1.

    PYTHONPATH=. .venv/bin/python bench/data.py --tokenize [--rounds 3]
"""

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from data_pipeline import EOD, DataConfig, build_dataloader, load_tokenizer
from data_pipeline.corpus import builtin_corpus
from data_pipeline.offline_tokenize import tokenize_corpus
from data_pipeline.sources import discover


def cpu_seconds() -> float:
    """This process and its finished children (DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bare_loop(shards: list[Path], tokenizer, tokens: int) -> tuple[float, float]:
    """The least a loader could do: read each JSON line, tokenize it, append EOD. Returns (tokens/s, CPU s)."""
    eod = tokenizer.token_to_id(EOD)
    start, cpu, done = time.perf_counter(), cpu_seconds(), 0
    while done < tokens:
        for shard in shards:
            with open(shard, encoding="utf-8") as lines:
                for line in lines:
                    done += len(tokenizer.encode(json.loads(line)["text"]).ids + [eod])
                    if done >= tokens:
                        return done / (time.perf_counter() - start), cpu_seconds() - cpu
    return done / (time.perf_counter() - start), cpu_seconds() - cpu


def pipeline(cfg: DataConfig, micro_batch_size: int, tokens: int) -> tuple[float, float, float]:
    """Returns (seconds to the first batch, tokens/s after it, CPU s in all): start-up is paid once per run."""
    start, cpu = time.perf_counter(), cpu_seconds()
    loader = build_dataloader(cfg, micro_batch_size=micro_batch_size, dp_rank=0, dp_size=1, seed=0)
    done = next(loader).numel()
    first = time.perf_counter()
    while done < tokens:
        done += next(loader).numel()
    rate = done / (time.perf_counter() - first)
    del loader  # joins the workers, so their CPU time is counted
    return first - start, rate, cpu_seconds() - cpu


def offline_tokenize(cfg: DataConfig, rounds: int) -> None:
    """Whole runs, start-up included (the pool's fork, the tokenizer's load), as a user waits for them."""
    best = {1: 0.0, 2: 0.0}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(rounds):
            for workers in best:
                start = time.perf_counter()
                meta = tokenize_corpus(cfg.sources, Path(out) / f"workers-{workers}", cfg, workers)
                best[workers] = max(best[workers], meta.tokens / (time.perf_counter() - start))
    shards = sum(len(discover(source).shards) for source in cfg.sources)
    print(f"parallax tokenize: {meta.documents:,} documents, {meta.tokens:,} tokens in {shards} shards, "
          f"best of {rounds} rounds")
    for workers, rate in best.items():
        print(f"{workers} worker{'s' if workers > 1 else ' '}: {rate:10,.0f} tokens/s")
    print(f"2 workers / 1: {best[2] / best[1]:.2f}x (target >= 1.6)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2_000_000)  # about one pass over the built-in corpus
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--source", type=Path, help="a .jsonl file or directory; default: the built-in corpus")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--tokenize", action="store_true", help="time `parallax tokenize` with 1 and 2 workers")
    args = parser.parse_args()
    cfg = DataConfig(seq_len=args.seq_len, num_workers=args.num_workers)
    source = builtin_corpus(cfg.cache_dir) if args.source is None else DataConfig(sources=[{"path": args.source}]).sources[0]
    cfg = cfg.model_copy(update={"sources": [source]})
    tokenizer = load_tokenizer(cfg)  # builds and caches the built-in corpus and tokenizer outside the timings
    if args.tokenize:
        offline_tokenize(cfg, args.rounds)
        return
    shards = [shard.path for shard in discover(source).shards]
    bare, piped = {"rate": 0.0, "cpu": float("inf")}, {"rate": 0.0, "cpu": float("inf"), "startup": float("inf")}
    for _ in range(args.rounds):  # alternating rounds, best of each: fair on a machine shared with other work
        rate, cpu = bare_loop(shards, tokenizer, args.tokens)
        bare = {"rate": max(bare["rate"], rate), "cpu": min(bare["cpu"], cpu)}
        startup, rate, cpu = pipeline(cfg, args.micro_batch_size, args.tokens)
        piped = {"rate": max(piped["rate"], rate), "cpu": min(piped["cpu"], cpu), "startup": min(piped["startup"], startup)}
    per_million = 1e6 / args.tokens
    print(f"{args.tokens:,} tokens, seq_len={args.seq_len}, micro_batch_size={args.micro_batch_size}, "
          f"num_workers={args.num_workers}, best of {args.rounds} rounds")
    print(f"bare loop : {bare['rate']:10,.0f} tokens/s   {bare['cpu'] * per_million:6.2f} CPU s per 1M tokens")
    print(f"pipeline  : {piped['rate']:10,.0f} tokens/s   {piped['cpu'] * per_million:6.2f} CPU s per 1M tokens   "
          f"{piped['startup']:.2f} s to the first batch")
    print(f"pipeline / bare: speed {piped['rate'] / bare['rate']:.2f} (target >= 0.80), "
          f"CPU cost {piped['cpu'] / bare['cpu']:.2f} (target <= 1.20)")


if __name__ == "__main__":
    main()
