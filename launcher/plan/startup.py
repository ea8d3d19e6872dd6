"""What a rank costs before its first step: host RAM while its model is built, and the time to draw it.

Training builds the model in fp32 on the host (launcher/train.py) and the engine then moves it to
the GPU. Each rank allocates and draws only what it keeps, its TP slice of every split weight and
its own experts (models/init.py), so both figures follow the per-rank parameter count; megatron's
full-matrix initialisation, which this replaced, drew the whole model on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.plan.count import ParameterCount

# Nanoseconds to allocate and draw one element on one CPU core, per-slice seeding included:
# bench/init.py's "sliced" rows at T-NLG width (hidden 4256), 10.0-11.8 measured on a shared 2-core
# x86 build machine (docs/initialisation.md). A rank draws single-threaded, so the figure is per rank.
CPU_NS_PER_ELEMENT = 10.0
FP32_BYTES = 4


@dataclass(frozen=True)
class Startup:
    host_bytes: float  # this rank's fp32 weights, resident on the host until the engine moves them
    init_seconds: float


def startup_per_rank(count: ParameterCount) -> Startup:
    return Startup(host_bytes=count.per_rank * FP32_BYTES, init_seconds=count.per_rank * CPU_NS_PER_ELEMENT * 1e-9)
