"""The `parallax` command line.

Building the parser imports only what the arguments' help needs; each command imports its own
machinery (the config, torch, DeepSpeed, megatron-core, datasets) when it runs, so `parallax --help`
and a mistyped argument answer at once instead of after seconds of imports.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from launcher.arg_types import non_negative_int, positive_int, segment_counts
from launcher.console import quiet_third_party
from launcher.plan.cli import add_plan_command
from launcher.slurm.status import add_status_command
from launcher.slurm.submit import add_submit_command

DESCRIPTION = ("Parallax: distributed GPT and T5 pretraining with Megatron tensor parallelism under DeepSpeed "
               "ZeRO 0-3, on local ranks or SLURM, on GPUs or CPUs, proven equal to one process.")


def _train(args) -> None:
    """Validate here, before any rank starts, then launch the ranks."""
    from launcher.config import load_config

    if args.resume is not None:
        args.overrides = [*args.overrides, f"checkpoint.resume={args.resume}"]
    cfg = load_config(args.config, args.overrides)
    cfg.check_world_size(args.nproc)
    _launch([args.config, *args.overrides], args.nproc, args.max_restarts)


def _eval(args) -> None:
    """`parallax eval`: the checkpoint's own config, at the layout and on the data the overrides give."""
    import json

    from launcher.config import ConfigError, load_config
    from launcher.output_paths import output_file
    from parallel.checkpoint import find_checkpoint

    path = find_checkpoint(Path(args.path), args.step)
    out = output_file(args.out, "--out", default=path / "eval.json")  # before the ranks work, not after
    overrides = [*args.overrides, f"checkpoint.resume={path.resolve()}"]
    if args.batches is not None:
        overrides.append(f"train.eval_batches={args.batches}")
    if args.data:
        overrides.append(f"data.validation={json.dumps([{'path': str(Path(p).resolve())} for p in args.data])}")
    config = path / "config.yaml"
    if (args.segments or args.samples) and load_config(config, overrides).data.fact_task is None:
        raise ConfigError(f"--segments and --samples score data.fact_task, which {config} does not train on; "
                          "remove them to evaluate the validation loss")
    if args.segments:
        overrides.append(f"data.fact_task.eval_segments={json.dumps(args.segments)}")
    if args.samples:
        overrides.append(f"data.fact_task.eval_samples={args.samples}")
    load_config(config, overrides).check_world_size(args.nproc)
    _launch(["--evaluate", str(out.resolve()), str(config), *overrides], args.nproc, max_restarts=0)


def _launch(entry_args: list[str], nproc: int, max_restarts: int) -> None:
    """Start `nproc` local ranks of `python -m launcher.entry ENTRY_ARGS` through torch's elastic launcher.

    With max_restarts, torchrun restarts every rank when one dies, and they resume from the newest
    complete checkpoint (checkpoint.resume=auto). On SIGTERM/SIGINT torchrun passes the signal on to
    the ranks, which save and exit "requeue me". SIGUSR1 (SLURM's early warning) would end torchrun
    itself, so it is passed on the same way.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    import torch

    from launcher.errors import (DIVERGED_EXIT_CODE, HANG_EXIT_CODE, REQUEUE_EXIT_CODE, SAVE_FAILED_EXIT_CODE,
                                 USER_ERROR_EXIT_CODE)

    ranks_have_said_why = {USER_ERROR_EXIT_CODE, SAVE_FAILED_EXIT_CODE, REQUEUE_EXIT_CODE, DIVERGED_EXIT_CODE,
                           HANG_EXIT_CODE}

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    # A restarted round must not share the rendezvous store with the round that died: its keys
    # (each gloo/NCCL group's peer addresses) would send the new ranks to dead peers (pytorch#135712).
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    # Megatron's tensor-parallel layers overlap their collectives with compute only when CUDA keeps one
    # queue of work per device (they warn otherwise); harmless on CPUs.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    # One BLAS thread per core: more ranks than cores would only thrash.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    torchrun_args = get_args_parser().parse_args([
        "--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
        "--module", "launcher.entry", *entry_args,
    ])

    def pass_on(signum, frame):
        raise SignalException(f"parallax got {signal.Signals(signum).name}", sigval=signal.Signals(signum))

    signal.signal(signal.SIGUSR1, pass_on)
    try:
        run(torchrun_args)
    except SignalException:  # the ranks got the signal too, and have saved (see above)
        sys.exit(REQUEUE_EXIT_CODE)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode not in ranks_have_said_why:
            print(f"parallax: error: rank {rank} exited with code {failure.exitcode}; its output is above",
                  file=sys.stderr)
        sys.exit(failure.exitcode if failure.exitcode > 0 else 1)


def _consolidate(args) -> None:
    from launcher.output_paths import output_file
    from parallel.checkpoint import consolidate, find_checkpoint

    path = find_checkpoint(Path(args.run_dir), args.step)
    out = output_file(args.out, "--out", default=Path(args.run_dir) / f"consolidated-{path.name}.pt")
    n_params = consolidate(path, out)
    print(f"parallax: wrote {out}: {n_params / 1e6:.2f}M fp32 parameters from {path}")


def _export(args) -> None:
    """`parallax export`: a checkpoint as the Hugging Face model it is exactly (GPT-2, Llama, T5, BERT, RoBERTa,
    Megatron-BERT), or one line why not."""
    from launcher.config import ConfigError

    if args.dtype not in ("fp32", "bf16"):
        raise ConfigError(f"--dtype {args.dtype} is not supported; choose fp32 or bf16")
    from launcher.output_paths import output_directory
    from launcher.twin_checkpoint import read_twin_checkpoint
    from models.huggingface import export
    from parallel.checkpoint import read_weights

    out = output_directory(args.out, "--out", new_or_empty=True)
    checkpoint = read_twin_checkpoint(Path(args.path), args.step, "export")
    twin = export(read_weights(checkpoint.path), checkpoint.cfg.model, checkpoint.vocab_size, checkpoint.tokenizer,
                  out, args.dtype, checkpoint.cfg.data.special_tokens)
    print(f"parallax: wrote {out}: {twin.NAME} ({args.dtype}, vocabulary {checkpoint.vocab_size}) "
          f"from {checkpoint.path}")


def _generate(args) -> None:
    """`parallax generate`: the flags are checked before the model loads, which takes seconds."""
    from launcher.generate import Sampling, generate, load

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    sampling.check()
    with load(Path(args.path), args.step) as (model, tokenizer):
        print(generate(model, tokenizer, args.prompt, sampling))


def _add_generate_command(commands) -> None:
    from launcher.generate import Sampling  # cheap: launcher/generate.py imports torch and transformers when it runs

    default = Sampling()
    generate = commands.add_parser("generate", help="sample a prompt's continuation from a checkpoint or a Hugging "
                                   "Face model directory")
    generate.add_argument("path", metavar="RUN|CHECKPOINT|HF_DIR", help="a run directory (its newest checkpoint), "
                          "its checkpoints directory, one checkpoint, or a Hugging Face model directory")
    generate.add_argument("--prompt", required=True, help="the text to continue (a T5's encoder input)")
    generate.add_argument("--max-new-tokens", type=int, default=default.max_new_tokens, metavar="N",
                          help="at most N tokens; fewer if the model ends the text (default %(default)s)")
    generate.add_argument("--temperature", type=float, default=default.temperature, metavar="T",
                          help="0: greedy, the most likely token each time (default %(default)s: sample)")
    generate.add_argument("--top-k", type=int, default=default.top_k, metavar="K",
                          help="sample from the K most likely tokens (default %(default)s: all)")
    generate.add_argument("--top-p", type=float, default=default.top_p, metavar="P",
                          help="sample from the most likely tokens that hold probability P (default %(default)s: all)")
    generate.add_argument("--seed", type=int, default=default.seed, metavar="S",
                          help="the sampling's seed: the same seed, the same text (default %(default)s)")
    generate.add_argument("--step", type=non_negative_int, default=None, help="that step's checkpoint of the run")
    generate.set_defaults(run=_generate)


def _fill_mask(args) -> None:
    from launcher.fill_mask import run

    print(run(Path(args.path), args.step, args.text, args.top_k))


def _add_fill_mask_command(commands) -> None:
    fill = commands.add_parser("fill-mask", help="an encoder's most likely fillers for each <mask> of a text, "
                               "from a checkpoint or a Hugging Face model directory")
    fill.add_argument("path", metavar="RUN|CHECKPOINT|HF_DIR", help="a run directory (its newest checkpoint), its "
                      "checkpoints directory, one checkpoint, or a Hugging Face model directory")
    fill.add_argument("--text", required=True, help="the text, with <mask> where a token is missing")
    fill.add_argument("--top-k", type=int, default=5, metavar="K", help="fillers per mask (default %(default)s)")
    fill.add_argument("--step", type=non_negative_int, default=None, help="that step's checkpoint of the run")
    fill.set_defaults(run=_fill_mask)


def _add_data_commands(commands) -> None:
    """`prepare-data`, `prepare-tokenizer` and `tokenize`: make the built-in corpus, a tokenizer.json and a
    token corpus ahead of a run."""
    from data_pipeline.corpus import DEFAULT_MAX_BYTES, DEFAULT_NUM_SHARDS

    def prepare_data(args) -> None:
        from data_pipeline import prepare_data
        from launcher.output_paths import output_directory

        out_dir = output_directory(args.out_dir, "OUT_DIR")
        shards = prepare_data(out_dir, max_bytes=args.max_bytes, num_shards=args.num_shards)
        print(f"parallax: wrote {len(shards)} JSON Lines shards of Python standard library source to {args.out_dir}")

    def prepare_tokenizer(args) -> None:
        from data_pipeline import prepare_tokenizer
        from launcher.output_paths import output_file

        out = prepare_tokenizer(args.sources, output_file(args.out, "--out"), vocab_size=args.vocab_size)
        print(f"parallax: wrote byte-level BPE tokenizer ({args.vocab_size} tokens) to {out}")

    def tokenize(args) -> None:
        from data_pipeline.config import EOD, DataConfig
        from data_pipeline.offline_tokenize import tokenize_corpus
        from data_pipeline.token_files import TokenFile
        from launcher.output_paths import output_file

        prefix = output_file(args.out, "--out")
        eod = args.eod_token or EOD
        # The corpus holds no padding, so the eod token may stand for the pad that load_tokenizer asks for.
        tokenizer_cfg = DataConfig(tokenizer=args.tokenizer, eod_token=eod, pad_token=eod)
        shown = []
        try:
            try:
                meta = tokenize_corpus(args.sources, prefix, tokenizer_cfg, args.workers,
                                       progress=lambda report: shown.append(_show_tokenize_progress(report)))
            finally:
                if shown:  # ends the progress line, whose last state stays on screen above a summary or an error
                    print(file=sys.stderr)
        except KeyboardInterrupt:  # Ctrl-C is no error to trace: the workers are gone and nothing half-written stays
            print(f"parallax: interrupted; {prefix}.bin/.idx were left as they were", file=sys.stderr)
            sys.exit(128 + signal.SIGINT)
        last = shown[-1]
        print(f"parallax: wrote {prefix}.bin/.idx: {meta.documents:,} documents, {meta.tokens:,} tokens "
              f"({TokenFile(prefix).dtype}), {last.tokens_per_second:,.0f} tokens/s with {last.workers} workers")

    data = commands.add_parser("prepare-data", help="write the built-in corpus (stdlib source) as shard files")
    data.add_argument("out_dir", help="directory for the .jsonl shards")
    data.add_argument("--max-bytes", type=positive_int, default=DEFAULT_MAX_BYTES,
                      help="text to sample (default %(default)s)")
    data.add_argument("--num-shards", type=positive_int, default=DEFAULT_NUM_SHARDS,
                      help="files to write (default %(default)s)")
    data.set_defaults(run=prepare_data)
    tokenizer = commands.add_parser("prepare-tokenizer", help="train a byte-level BPE tokenizer.json on local files")
    tokenizer.add_argument("sources", nargs="+", help="text/.jsonl/.parquet files or directories to train on")
    tokenizer.add_argument("--out", required=True, help="where to write tokenizer.json")
    tokenizer.add_argument("--vocab-size", type=int, default=8192, help="default %(default)s")
    tokenizer.set_defaults(run=prepare_tokenizer)
    corpus = commands.add_parser("tokenize", help="tokenize text sources once into a Megatron .bin/.idx corpus")
    corpus.add_argument("sources", nargs="+", help="text/.jsonl/.parquet files or directories, in this order")
    corpus.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.bin, PREFIX.idx, "
                        "PREFIX.meta.json")
    corpus.add_argument("--workers", type=positive_int, default=None, metavar="N",
                        help="processes, one shard file each at a time (default: one per CPU, at most one per shard)")
    corpus.add_argument("--tokenizer", type=Path, default=None, metavar="tokenizer.json",
                        help="default: the built-in tokenizer that training uses with no data.tokenizer")
    corpus.add_argument("--eod-token", default=None, metavar="TOKEN",
                        help="appended to every document (default: <|endoftext|>, the built-in tokenizer's)")
    corpus.set_defaults(run=tokenize)


def _show_tokenize_progress(report):
    """Rewrites one stderr line in place per shard; returns the report, so the summary can quote the last."""
    print(f"\r{report.documents:,} documents, {report.tokens:,} tokens, {report.tokens_per_second:,.0f} tokens/s, "
          f"{report.shards_done}/{report.shards_total} shards", end="", file=sys.stderr, flush=True)
    return report


class _OneLineErrors(argparse.ArgumentParser):
    """A bad argument is one line and exit code 2, as all bad input is; argparse printed its usage above
    it. Every command's parser is one (argparse makes subcommands' parsers of their parent's class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog="parallax", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="pretrain on local ranks started by torchrun")
    train.add_argument("config", help="run config YAML, e.g. configs/gpt-tiny.yaml")
    train.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. parallel.tp=2 optim.lr=3e-4")
    train.add_argument("--nproc", type=positive_int, default=1, help="ranks to start on this machine (default 1)")
    train.add_argument("--resume", metavar="auto|none|PATH", default=None,
                       help="auto (default): the newest complete checkpoint of the run; none: start afresh; "
                       "PATH: that checkpoint (same as checkpoint.resume=...)")
    train.add_argument("--max-restarts", type=non_negative_int, default=0, metavar="K",
                       help="when a rank dies, restart all ranks from the newest checkpoint, up to K times")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="the validation loss of a checkpoint, at any layout")
    evaluate.add_argument("path", metavar="RUN|CHECKPOINT", help="a run directory (its newest checkpoint), its "
                          "checkpoints directory, or one checkpoint")
    evaluate.add_argument("overrides", nargs="*", default=[],
                          help="dotted overrides of the checkpoint's config, e.g. parallel.tp=2")
    evaluate.add_argument("--data", nargs="+", metavar="PATH", help="validation data (data.validation); default: "
                          "the run's validation set")
    evaluate.add_argument("--batches", type=int, metavar="N", help="global batches to read (train.eval_batches)")
    evaluate.add_argument("--segments", type=segment_counts, metavar="1,2,4,...", help="data.fact_task: the "
                          "accuracy and loss at each of these segment counts")
    evaluate.add_argument("--samples", type=positive_int, metavar="N", help="data.fact_task: held-out samples per "
                          "segment count (data.fact_task.eval_samples)")
    evaluate.add_argument("--nproc", type=positive_int, default=1, help="ranks to start on this machine (default 1)")
    evaluate.add_argument("--step", type=non_negative_int, default=None, help="that step's checkpoint of the run")
    evaluate.add_argument("--out", default=None, help="the JSON result (default: CHECKPOINT/eval.json)")
    evaluate.set_defaults(run=_eval)

    checkpoint = commands.add_parser("checkpoint", help="inspect and export checkpoints")
    checkpoint_commands = checkpoint.add_subparsers(dest="checkpoint_command", required=True)
    consolidate = checkpoint_commands.add_parser(
        "consolidate", help="write one file holding the full fp32 model state dict of a checkpoint")
    consolidate.add_argument("run_dir", metavar="RUN", help="run directory (or its checkpoints directory)")
    consolidate.add_argument("--step", type=non_negative_int, default=None,
                             help="default: the newest complete checkpoint")
    consolidate.add_argument("--out", default=None, help="default: RUN/consolidated-step-NNNNNNNN.pt")
    consolidate.set_defaults(run=_consolidate)
    export = commands.add_parser("export", help="write a checkpoint as a Hugging Face model directory (GPT-2, Llama, T5, BERT, "
                                    "RoBERTa, Megatron-BERT)")
    export.add_argument("path", metavar="RUN|CHECKPOINT", help="a run directory (its newest checkpoint), its "
                        "checkpoints directory, or one checkpoint")
    export.add_argument("--out", required=True, help="the directory to write (config.json, model.safetensors, tokenizer)")
    export.add_argument("--step", type=non_negative_int, default=None, help="that step's checkpoint of the run")
    export.add_argument("--dtype", default="fp32", metavar="fp32|bf16", help="weights' type (default %(default)s)")
    export.set_defaults(run=_export)
    _add_generate_command(commands)
    _add_fill_mask_command(commands)
    _add_data_commands(commands)
    add_plan_command(commands)
    add_submit_command(commands)
    add_status_command(commands)
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
    from launcher.errors import USER_ERRORS, exit_with

    quiet_third_party()
    try:
        args.run(args)
    except USER_ERRORS as e:
        exit_with(e)


if __name__ == "__main__":
    main()
