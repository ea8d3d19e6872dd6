"""train.profile_steps: torch.profiler traces of chosen steps, where TensorBoard's profile plugin finds them.

Traces go to <run_dir>/tensorboard/plugins/profile/steps-A-B/, one per rank; on CUDA a memory snapshot of the
same steps goes beside them (open it at pytorch.org/memory_viz). Nothing is recorded without the setting.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


class StepProfiler:
    def __init__(self, steps: Optional[tuple[int, int]], run_dir: Path, rank: int, device: torch.device):
        self.first, self.last = steps or (0, -1)
        self.dir = Path(run_dir) / "tensorboard" / "plugins" / "profile" / f"steps-{self.first}-{self.last}"
        self.rank, self.cuda = rank, device.type == "cuda"
        self.profiler = None

    def begin_step(self, step: int) -> None:
        if step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            _record_memory_history(True)
        self.profiler = torch.profiler.profile(
            activities=activities, record_shapes=True, profile_memory=True,
            # a schedule, even of only active steps, is what marks each step (ProfilerStep#N) in the trace
            schedule=torch.profiler.schedule(wait=0, warmup=0, active=self.last - self.first + 1, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.dir), worker_name=f"rank-{self.rank}"))
        self.profiler.start()

    def end_step(self, step: int) -> None:
        """Marks the step's end in the trace; after the last, writes it (and the memory snapshot)."""
        if self.profiler is None:
            return
        self.profiler.step()
        if step == self.last:
            self.profiler.stop()
            self.profiler = None
            if self.cuda:
                _dump_memory_snapshot(self.dir / f"memory-snapshot-rank-{self.rank}.pickle")
                _record_memory_history(False)


def _record_memory_history(enabled: bool) -> None:
    """torch.cuda.memory's private recorder (torch 2.1 to 2.13 at least): the one API for allocation stacks."""
    torch.cuda.memory._record_memory_history(enabled="all" if enabled else None)


def _dump_memory_snapshot(path: Path) -> None:
    torch.cuda.memory._dump_snapshot(str(path))
