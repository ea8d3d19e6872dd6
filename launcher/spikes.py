"""Loss spikes: when a step's loss is far above the recent ones, and which batches to drop after one.

OPT-175B's and BLOOM's logbooks record the remedy done by hand: go back to a checkpoint from before the
spike and skip the data that led to it. The training loop does it (launcher/train.py) when train.spike is
set; this module only says when, and what to skip. The losses are the ones the loop reads at its logging
steps, so calling a spike costs no extra synchronisation, and is called at the logging step after it.
"""
from __future__ import annotations

import statistics
from collections import deque
from typing import Optional

from launcher.config import SpikeConfig


class SpikeDetector:
    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.recent: deque[tuple[int, float]] = deque(maxlen=cfg.window)  # (step, loss) of good steps

    def first_spike(self, records: list[dict]) -> Optional[dict]:
        """The first of `records` whose loss is above factor x the median of the window good losses before it.
        Steps skipped for non-finite figures or dropped batches are neither spikes nor part of the median."""
        for record in records:
            if record.get("skipped"):
                continue
            full = len(self.recent) == self.cfg.window
            if full and record["loss"] > self.cfg.factor * statistics.median(loss for _, loss in self.recent):
                return record
            self.recent.append((record["step"], record["loss"]))
        return None

    def median(self) -> float:
        return statistics.median(loss for _, loss in self.recent)

    def dropped_steps(self, spike_step: int) -> tuple[int, int]:
        """[first, last] steps whose batches are dropped: the spike's and the ones before it that led to it."""
        return max(1, spike_step - self.cfg.skip + 1), spike_step

    def rolled_back_to(self, step: int) -> None:
        """Forget the losses of the steps after `step`, which the run will take again."""
        self.recent = deque(((s, loss) for s, loss in self.recent if s <= step), maxlen=self.cfg.window)
