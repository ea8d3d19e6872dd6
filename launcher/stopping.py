"""When a run stops early: the signals that ask for it, and the agreement that makes every rank stop together.

SIGTERM (preemption, scancel, torchrun's shutdown) and SIGUSR1 (SLURM's --signal warning) only raise
a flag: the step in flight finishes, the loop saves a checkpoint, and the run exits "requeue me".
A rank listens from its first moments (launcher/entry.py), and a signal received before the
training loop starts is kept: a warning that lands while a rank imports, builds its model or loads
a large checkpoint stops the run after its first step instead of killing it.

Ranks receive a signal at slightly different times, so they vote on the control group (a gloo
group, parallel/topology.py) and stop after the same step. The vote is a one-integer all-reduce of
a CPU tensor, started as the step begins and read as it ends: it travels while the device
computes, and never waits for the device.
"""
from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist

_received: list[Optional[int]] = [None]  # the signal the handler saw, read at each vote


class StopRequested(Exception):
    """The run stopped early with a checkpoint of `step`, on a signal or train.stop_at_step; launch again to continue."""

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step} with a checkpoint; launch the same command again to continue")
        self.step = step


def listen_for_stop_signals() -> None:
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, lambda received, frame: _received.__setitem__(0, received))


class StopVote:
    """One step's vote, started by `StopVote(control_group)`; `received()` is the signal some rank
    received (the highest-numbered, if several), or None when no rank was asked to stop."""

    def __init__(self, control_group):
        self._signal = torch.tensor([_received[0] or 0], dtype=torch.int32)
        self._work = dist.all_reduce(self._signal, op=dist.ReduceOp.MAX, group=control_group, async_op=True)

    def received(self) -> Optional[signal.Signals]:
        self._work.wait()
        received = int(self._signal.item())  # a CPU tensor: no device synchronisation
        return signal.Signals(received) if received else None
