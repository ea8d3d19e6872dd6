"""What a rank costs before its first step: the memory its weights take as they are built, the host
RAM it draws them through, and the time to draw them.

Training builds the model where it trains it, in the precision it trains in, and at ZeRO-3
partitioned as each layer is built (parallel.engine.building_model). Each rank draws only what it
keeps, its TP slice of every split weight and its own experts (models/init.py), on one CPU core in
fp32, a tile of slices at a time, and copies each tile to its device: the host holds a tile (8 MiB of
rows or columns of a weight, or a whole expert matrix, which is drawn whole), or at ZeRO-3 the rows of
one parameter that its partition covers, and torch converts it to the run's precision on the host on
its way to a GPU. Megatron's full-matrix initialisation, which this replaced, drew the whole model on
every rank and held the rank's fp32 TP shard on the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from launcher.plan.memory import BYTES

if TYPE_CHECKING:
    from launcher.config import RunConfig
    from launcher.plan.count import ParameterCount

# Nanoseconds to allocate and draw one element on one CPU core, per-slice seeding included:
# bench/startup.py's "sliced" rows at T-NLG width (hidden 4256), 6.3-6.5 measured on an idle 2-core x86
# build machine (docs/initialisation.md), rounded up for a busy one. A rank draws single-threaded, so the
# figure is per rank.
CPU_NS_PER_ELEMENT = 8.0
FP32_BYTES = 4


@dataclass(frozen=True)
class Startup:
    built_bytes: float  # this rank's weights as built, on its device: at ZeRO-3 its partition and one layer
    host_bytes: float  # the fp32 draw tile on the host, and its copy in the run's precision
    init_seconds: float  # an upper bound at ZeRO-3, where a rank skips the rows of split weights it does not keep


def startup_per_rank(cfg: RunConfig, count: ParameterCount, dp: int) -> Startup:
    from models.init import DRAW_TILE_ELEMENTS

    m, zero3, precision = cfg.model, cfg.parallel.zero_stage == 3, cfg.train.precision
    kept = count.per_rank / dp + count.per_layer_per_rank if zero3 else count.per_rank
    largest_slice = m.hidden_size * (m.ffn_size if m.moe else 1)
    drawn_at_once = count.per_layer_per_rank / dp if zero3 else max(DRAW_TILE_ELEMENTS, largest_slice)
    converted = 0 if precision == "fp32" else BYTES[precision]
    return Startup(built_bytes=kept * BYTES[precision], host_bytes=drawn_at_once * (FP32_BYTES + converted),
                   init_seconds=count.per_rank * CPU_NS_PER_ELEMENT * 1e-9)
