"""The straggler report: each rank's own time per step, gathered at logging steps, and the rank far behind named.

In synchronous data parallelism every rank's wall-clock step is the same: the fast ranks wait for the slow one
inside the step's collectives. So a rank's own time is its CPU time (all its threads, intra-op ones included)
over the step: a rank waiting in a gloo collective burns none (measured: 0.002 s of CPU over a 1 s wait), and a
rank slowed by its host (data, Python, a throttled core) burns more. On CUDA this is the host's share of the
step; a slow GPU shows in it only as far as the host waits on it. The figures cross ranks once per logging
interval, on the control group, beside the records the loop reads there anyway.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from parallel.topology import Topology


class StragglerReport:
    def __init__(self, topo: Topology, factor: float):
        self.topo, self.factor = topo, factor
        self.cpu_seconds, self.steps, self.started = 0.0, 0, 0.0

    def begin_step(self) -> None:
        self.started = time.process_time()

    def end_step(self) -> None:
        self.cpu_seconds += time.process_time() - self.started
        self.steps += 1

    def read(self) -> tuple[dict, int | None]:
        """Every rank's mean CPU seconds per step since the last read (a collective: every rank calls it), as the
        figures of the logging step's record, and the straggler's rank if one is `factor` x the median."""
        mine = torch.tensor([self.cpu_seconds / max(1, self.steps)], dtype=torch.float64)
        everyone = [torch.zeros_like(mine) for _ in range(self.topo.world_size)]
        dist.all_gather(everyone, mine, group=self.topo.control_group)
        self.cpu_seconds, self.steps = 0.0, 0
        seconds = [float(t) for t in everyone]
        median, slowest = statistics.median(seconds), max(range(len(seconds)), key=seconds.__getitem__)
        figures = {"rank_cpu_seconds_min": min(seconds), "rank_cpu_seconds_median": median,
                   "rank_cpu_seconds_max": seconds[slowest], "slowest_rank": slowest}
        return figures, (slowest if seconds[slowest] > self.factor * median else None)
