"""Evaluation on data.fact_task: accuracy and loss of the answer, by number of segments (issue 26).

A memory model reads each held-out sample a segment at a time (GPT.read_segment), so what it holds does not
grow with the input: one segment of tokens and the memory, whatever the number of segments. A model without
memory reads the last segment, its window. Only the answer is scored: the loss is its cross-entropy, the
accuracy how often the argmax over the whole vocabulary is the answer. Each DP rank scores its share of the
samples (the same set at any layout) and the sums are all-reduced; TP peers compute together. Each segment
goes through the engine's forward (GPT.forward's `segment`), so ZeRO-3 gathers what it reads. The model runs
in eval mode without gradients and the random generators are forked around it, so training after an
evaluation is what it would have been.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from data_pipeline.fact_task import FactTask
from launcher.config import RunConfig
from launcher.curriculum import MemoryCurriculum
from models.blocks import language_model_loss
from parallel.topology import Topology


class FactTaskEvaluator:
    """Scores `samples` held-out samples at each segment count of `segment_counts`."""

    def __init__(self, cfg: RunConfig, topo: Topology, segment_counts: list[int]):
        self.topo, self.segment_counts = topo, segment_counts
        self.samples, self.batch_size = cfg.data.fact_task.eval_samples, cfg.train.micro_batch_size
        self.task = FactTask.build(cfg.data, cfg.task_segment_len(), cfg.train.seed, held_out=True)

    @classmethod
    def for_run(cls, cfg: RunConfig, topo: Topology) -> FactTaskEvaluator:
        """At data.fact_task.eval_segments, by default the longest input training reaches."""
        curriculum = cfg.train.memory_curriculum
        longest = max(curriculum.segments) if curriculum else MemoryCurriculum(cfg).fixed
        return cls(cfg, topo, cfg.data.fact_task.eval_segments or [longest])

    def __call__(self, runner, step: int, on_segment: Optional[Callable[[int, int], None]] = None) -> dict:
        """The record of an evaluation after optimizer step `step`: the figures at the longest count, and
        every count's in `by_segments`. `on_segment(segments, segment)` is called after each segment read."""
        engine, device, started = runner.engine, self.topo.device, time.perf_counter()
        engine.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
            by_segments = [self._score(engine, segments, on_segment) for segments in self.segment_counts]
        engine.train()
        last = by_segments[-1]
        return {"step": step, "eval_loss": last["loss"], "eval_ppl": math.exp(min(last["loss"], 700.0)),
                "eval_accuracy": last["accuracy"], "eval_segments": last["segments"], "eval_tokens": last["samples"],
                "by_segments": by_segments, "eval_seconds": time.perf_counter() - started}

    def _score(self, engine, segments: int, on_segment) -> dict:
        started, device = time.perf_counter(), self.topo.device
        mine = range(self.topo.dp_rank, self.samples, self.topo.dp)
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss, right answers, samples
        for first in range(0, len(mine), self.batch_size):
            indices = mine[first:first + self.batch_size]
            logits = self._read(engine, indices, segments, on_segment)  # [1, b, vocab / tp]: the question's end
            answers = torch.tensor([[self.task.answer(i, segments)] for i in indices], device=device)
            loss, _ = language_model_loss(logits, answers, reduction="sum")
            right = (self._whole_vocabulary(logits)[0].argmax(dim=-1) == answers[:, 0]).sum()
            totals += torch.stack([loss.double(), right.double(), torch.tensor(len(indices), device=device).double()])
        self.topo.sum_scored(totals)
        loss, right, samples = totals.tolist()
        return {"segments": segments, "accuracy": right / samples, "loss": loss / samples, "samples": int(samples),
                "seconds": time.perf_counter() - started}

    def _whole_vocabulary(self, logits: torch.Tensor) -> torch.Tensor:
        """This TP rank's vocabulary slice of the logits joined with its peers' (megatron's gather allocates on
        the current CUDA device, so it cannot serve a CPU run)."""
        if self.topo.tp == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.topo.tp)]
        dist.all_gather(parts, logits.contiguous(), group=self.topo.tp_group)
        return torch.cat(parts, dim=-1)

    def _read(self, engine, indices, segments: int, on_segment) -> torch.Tensor:
        """The logits at the last token of the samples `indices`: a memory model reads every segment, carrying
        its memory; a model without memory reads the last."""
        memory_model, device, memory, logits = engine.module.memory is not None, self.topo.device, None, None
        for segment, tokens in enumerate(self.task.segment_batches(indices, segments)):
            if memory_model:
                logits, memory = engine(tokens.to(device), segment=True, memory=memory)
            elif segment == segments - 1:
                logits = engine(tokens.to(device))[-1:]
            if on_segment is not None:
                on_segment(segments, segment)
        return logits
