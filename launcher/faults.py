"""Fault injection, for tests only: PARALLAX_FAULTS makes real ranks meet the failures long runs meet.

The one switch is the environment variable PARALLAX_FAULTS, a `;`-separated list of KIND@STEP:RANK[:AMOUNT]:
- `nan_loss@3:1`: rank 1's loss is NaN at step 3 (its backward makes every gradient NaN);
- `nan_grad@3:1`: rank 1's gradients are NaN at step 3, its loss finite;
- `spike@3:1:50`: rank 1's loss (and so its gradients) is 50 times what it is at step 3: a loss spike;
- `delay@3:1:0.5`: rank 1 computes 0.5 s longer at step 3 (it burns CPU in the training thread, as a slow
  device would make it late);
- `stall@3:1:60`: rank 1 stops for 60 s at step 3, before its first collective, where its peers then wait.
A step is the optimizer step, counted from 1 as the loop counts it. Nothing reads the variable but this
module, and a run without it installs nothing.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Literal

import torch

ENV = "PARALLAX_FAULTS"
Kind = Literal["nan_loss", "nan_grad", "spike", "delay", "stall"]
KINDS = ("nan_loss", "nan_grad", "spike", "delay", "stall")


@dataclass(frozen=True)
class Fault:
    kind: Kind
    step: int
    rank: int
    amount: float = 0.0  # seconds for delay and stall, the factor for spike


def parse(spec: str) -> tuple[Fault, ...]:
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        try:
            kind, where = item.split("@")
            step, rank, *amount = where.split(":")
            if kind not in KINDS:
                raise ValueError(kind)
            faults.append(Fault(kind, int(step), int(rank), float(amount[0]) if amount else 0.0))
        except ValueError:
            raise ValueError(f"{ENV}: {item!r} is not KIND@STEP:RANK[:AMOUNT] with KIND one of "
                             f"{', '.join(KINDS)}") from None
    return tuple(faults)


class Faults:
    """This rank's faults: the loop tells it the step (`begin_step`), which also delays or stalls there; the
    NaNs go in through hooks on the model, so no model code knows of them."""

    def __init__(self, faults: tuple[Fault, ...], rank: int):
        self.faults = tuple(fault for fault in faults if fault.rank == rank)
        self.step = 0

    @classmethod
    def from_env(cls, rank: int) -> Faults:
        return cls(parse(os.environ.get(ENV, "")), rank)

    def at(self, kind: Kind) -> Fault | None:
        return next((f for f in self.faults if f.kind == kind and f.step == self.step), None)

    def install(self, model: torch.nn.Module) -> None:
        """The loss is the model's output (or its first element); the gradient hook is on every parameter."""
        if any(f.kind in ("nan_loss", "spike") for f in self.faults):
            model.register_forward_hook(self._scale_loss)
        if any(f.kind == "nan_grad" for f in self.faults):
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.register_hook(lambda grad: grad * float("nan") if self.at("nan_grad") else grad)

    def _scale_loss(self, module, inputs, output):
        fault = self.at("nan_loss") or self.at("spike")
        if not (module.training and fault):
            return output
        factor = float("nan") if fault.kind == "nan_loss" else fault.amount
        if isinstance(output, tuple):
            return (output[0] * factor, *output[1:])
        return output * factor

    def begin_step(self, step: int) -> None:
        self.step = step
        if delay := self.at("delay"):
            deadline = time.thread_time() + delay.amount
            while time.thread_time() < deadline:  # busy, as a slow device keeps its rank busy
                pass
        if stall := self.at("stall"):
            time.sleep(stall.amount)
