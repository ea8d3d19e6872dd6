"""train.memory_curriculum: how many segments a recurrent-memory model's training samples have at each step.

RMT learns best when its inputs grow over training (Bulatov et al. 2023 credit the curriculum for stability),
and BABILong's vary_n_segments draws each batch's count at random up to the current one, so short inputs stay
in the mix. The count is a function of (seed, step) alone: every rank, TP peers included, agrees on it without
a word, and a resumed run goes on with the curriculum exactly where it stopped.
"""
from __future__ import annotations

import bisect

import numpy
import torch

from launcher.config import RunConfig


class MemoryCurriculum:
    def __init__(self, cfg: RunConfig):
        self.curriculum, self.seed = cfg.train.memory_curriculum, cfg.train.seed
        memory = cfg.model.memory
        # Without a curriculum, a sample is a training window (a memory model's) or, for a model without memory
        # on data.fact_task, one window of filler: the fact then sits in the window the model sees.
        self.fixed = cfg.data.seq_len // memory.segment_len if memory is not None else 1
        self.segment_len = cfg.task_segment_len()

    def segments_at(self, step: int) -> int:
        """The segments of step `step`'s samples (steps count from 1)."""
        if self.curriculum is None:
            return self.fixed
        current = self.curriculum.segments[bisect.bisect_right(self.curriculum.at_steps, step) - 1]
        if not self.curriculum.vary_n_segments:
            return current
        return int(numpy.random.default_rng([self.seed, step, 0x5E6]).integers(1, current + 1))

    def window(self, batch: torch.Tensor | dict, step: int) -> torch.Tensor | dict:
        """A corpus batch [b, data.seq_len + 1] cut to the step's segments (the rest of each window is not
        trained on); data.fact_task's batches are already that long."""
        if isinstance(batch, dict):
            return batch
        return batch[:, :self.segments_at(step) * self.segment_len + 1]
