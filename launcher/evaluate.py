"""Evaluation: the model's exact token-weighted loss on the validation set, without disturbing training.

Each rank evaluates its share of the fixed validation windows (data_pipeline/validation.py) and
the summed losses and token counts are all-reduced over DP, so the loss is the mean over every
evaluated token of every rank, whatever the layout. The model runs in eval mode (no dropout, MoE's
evaluation capacity factor), without gradients and outside the optimizer, and the random
generators are forked around it: training after an evaluation is bitwise what it would have been.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from data_pipeline.validation import validation_batches
from launcher.config import RunConfig
from parallel.pipeline import StepRunner, step_runner
from parallel.topology import Topology


class Evaluator:
    """Evaluates on `batches`, this rank's share of the validation set, the same ones every time."""

    def __init__(self, topo: Topology, batches: list):
        self.topo, self.batches = topo, batches

    @classmethod
    def for_run(cls, cfg: RunConfig, topo: Topology) -> Evaluator:
        """Reads this rank's validation batches now, so that bad validation data stops the run before
        its first step."""
        batches = validation_batches(
            cfg.data, batches=cfg.train.eval_batches, micro_batch_size=cfg.train.micro_batch_size,
            grad_accum=cfg.train.grad_accum, dp_rank=topo.dp_rank, dp_size=topo.dp, seed=cfg.train.seed)
        available = len(batches) // cfg.train.grad_accum
        if available < cfg.train.eval_batches and topo.is_logging_rank:
            print(f"parallax: the validation set holds {available} global batches; each evaluation reads them all "
                  f"(train.eval_batches={cfg.train.eval_batches})", flush=True)
        return cls(topo, batches)

    def __call__(self, runner: StepRunner, step: int) -> dict:
        """The record of an evaluation after optimizer step `step` (0: before the first)."""
        device, started, engine = self.topo.device, time.perf_counter(), runner.engine
        engine.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
            micro_batches = [{name: t.to(device) for name, t in engine.module.batch_inputs(batch).items()}
                             for batch in self.batches]
            totals = torch.stack(runner.evaluate(micro_batches))  # summed loss, tokens
        engine.train()
        self.topo.sum_scored(totals)
        loss_sum, tokens, *right = totals.tolist()  # waits for the device, so the clock below includes its work
        loss = loss_sum / tokens
        accuracy = {"eval_accuracy": right[0] / tokens} if right else {}  # BERT: masked tokens predicted
        return {"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": int(tokens),
                **accuracy, "eval_seconds": time.perf_counter() - started}


def evaluator_for_run(cfg: RunConfig, topo: Topology):
    """The run's evaluation: the validation loss, or data.fact_task's answers by segment count."""
    if cfg.data.fact_task is not None:
        from launcher.evaluate_fact_task import FactTaskEvaluator

        return FactTaskEvaluator.for_run(cfg, topo)
    return Evaluator.for_run(cfg, topo)


def evaluate_checkpoint(cfg: RunConfig, out: Path, on_segment=None) -> dict:
    """`parallax eval` on this rank: the weights of the checkpoint cfg.checkpoint.resume names, at
    cfg's layout (any: checkpoints do not depend on it), evaluated on cfg's validation set. Rank 0
    prints the result and writes it to `out` as JSON. on_segment: data.fact_task's per-segment callback
    (FactTaskEvaluator), for bench/memory.py's trace of memory and time."""
    from launcher.train import build_model_and_engine
    from parallel.checkpoint import Checkpointer
    from parallel.topology import init_topology

    p = cfg.parallel
    topo = init_topology(tp=p.tp, ep=p.ep, pp=p.pp, timeout_minutes=p.timeout_minutes)
    vocab_size = cfg.check_vocab_size()
    evaluate = evaluator_for_run(cfg, topo)
    torch.manual_seed(cfg.train.seed)
    _, engine = build_model_and_engine(cfg, topo, vocab_size, init_from=None)  # the checkpoint has the weights
    resumed = Checkpointer(cfg, topo, engine, loader=None).resume()
    record = evaluate(step_runner(engine, cfg, topo), step=resumed.step,
                      **({"on_segment": on_segment} if on_segment else {}))
    result = {"checkpoint": cfg.checkpoint.resume, **record, "layout": topo.describe()}
    if topo.is_logging_rank:
        out.write_text(json.dumps(result, indent=1) + "\n")
        for count in record.get("by_segments", []):
            print(f"parallax: {count['segments']:>6} segments: accuracy {count['accuracy']:.1%}  loss "
                  f"{count['loss']:.4f}  ({count['samples']} samples, {count['seconds']:.1f}s)", flush=True)
        accuracy = f"accuracy {record['eval_accuracy']:.2%}  " if "eval_accuracy" in record else ""
        print(f"parallax: eval of {cfg.checkpoint.resume} (step {record['step']}, {topo.describe()}): "
              f"loss {record['eval_loss']:.4f}  ppl {record['eval_ppl']:.2f}  {accuracy}{record['eval_tokens']:,} tokens  "
              f"{record['eval_seconds']:.1f}s; written to {out}", flush=True)
    return result
