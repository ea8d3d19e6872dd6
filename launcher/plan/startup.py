"""What a rank costs before its first step: the memory its weights take as they are built, the host
RAM it draws them through, and the time to draw them.

Training builds the model where it trains it, in the precision it trains in, and at ZeRO-3
partitioned as each layer is built (parallel.engine.building_model). Each rank draws only what it
keeps, its TP slice of every split weight and its own experts (models/init.py), on one CPU core in
fp32, one slice at a time, and copies each slice to its device: the host holds a slice (a row or a
column of a weight, about hidden_size numbers; a whole expert matrix, which is drawn whole), or at
ZeRO-3 the rows of one parameter that its partition covers. Megatron's full-matrix initialisation,
which this replaced, drew the whole model on every rank and held the rank's fp32 TP shard on the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from launcher.plan.memory import BYTES

if TYPE_CHECKING:
    from launcher.config import RunConfig
    from launcher.plan.count import ParameterCount

# Nanoseconds to allocate and draw one element on one CPU core, per-slice seeding included:
# bench/startup.py's "sliced" rows at T-NLG width (hidden 4256), 10.0-11.8 measured on a shared 2-core
# x86 build machine (docs/initialisation.md). A rank draws single-threaded, so the figure is per rank.
CPU_NS_PER_ELEMENT = 10.0
FP32_BYTES = 4


@dataclass(frozen=True)
class Startup:
    built_bytes: float  # this rank's weights as built, on its device: at ZeRO-3 its partition and one layer
    host_bytes: float  # the fp32 draw buffer on the host
    init_seconds: float  # an upper bound at ZeRO-3, where a rank skips the rows of split weights it does not keep


def startup_per_rank(cfg: RunConfig, count: ParameterCount, dp: int) -> Startup:
    m, zero3 = cfg.model, cfg.parallel.zero_stage == 3
    kept = count.per_rank / dp + count.per_layer_per_rank if zero3 else count.per_rank
    drawn_at_once = count.per_layer_per_rank / dp if zero3 else m.hidden_size * (m.ffn_size if m.moe else 1)
    return Startup(built_bytes=kept * BYTES[cfg.train.precision], host_bytes=drawn_at_once * FP32_BYTES,
                   init_seconds=count.per_rank * CPU_NS_PER_ELEMENT * 1e-9)
