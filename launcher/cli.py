"""The `parallax` command line."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from launcher.config import load_config
from launcher.errors import USER_ERROR_EXIT_CODE, USER_ERRORS, exit_with


def _train(args) -> None:
    """Validate here, before any rank starts, then launch the ranks through torch's elastic launcher."""
    cfg = load_config(args.config, args.overrides)
    cfg.check_world_size(args.nproc)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    # One BLAS thread per core: more ranks than cores would only thrash.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    torchrun_args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={args.nproc}", "--module", "launcher.entry", args.config, *args.overrides]
    )
    try:
        run(torchrun_args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode != USER_ERROR_EXIT_CODE:  # a user error has already said what it is
            print(f"parallax: error: rank {rank} exited with code {failure.exitcode}; its output is above",
                  file=sys.stderr)
        sys.exit(failure.exitcode if failure.exitcode > 0 else 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parallax", description="Distributed GPT pretraining.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="pretrain on local ranks started by torchrun")
    train.add_argument("config", help="run config YAML, e.g. configs/gpt-tiny.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 optim.lr=3e-4")
    train.add_argument("--nproc", type=int, default=1, help="ranks to start on this machine (default 1)")
    train.set_defaults(run=_train)
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    # Overrides may follow options (`train cfg.yaml --nproc 2 parallel.tp=2`): collect them wherever they stand.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        args.run(args)
    except USER_ERRORS as e:
        exit_with(e)


if __name__ == "__main__":
    main()
