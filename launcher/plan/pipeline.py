"""Pipeline parallelism on paper: what each pipeline rank holds, how many micro-batches' activations
its schedule keeps, the bubble, and the point-to-point traffic between stages.

Ranks are ordered as Megatron orders them (tp-ep-dp-pp): TP peers adjacent, PP slowest, so stage s is
ranks [s W/p, (s+1) W/p) of a world of W. With v virtual stages per rank (the interleaved 1F1B schedule
of Narayanan et al. 2021), pipeline rank r holds virtual stages r, r + p, ..., r + (v-1) p of
cfg.stage_layers(). The first rank also holds the word embedding (and learned positions), the last
the final norm, the output layer and the loss; a tied output layer is a copy of the word embedding on
the last rank, kept equal to the first rank's by all-reducing their gradients. Without a pipeline the
one rank holds everything, and the arithmetic below gives back the unpipelined figures.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.config import RunConfig
    from launcher.plan.hardware import Cluster


@dataclass(frozen=True)
class PipelineRank:
    index: int  # 0: the first stage
    layers: tuple[int, ...]  # global indices of the blocks it holds, over all its virtual stages
    first: bool  # holds the embedding
    last: bool  # holds the final norm, the output layer and the loss
    in_flight: float  # micro-batches whose activations of all `layers` it keeps at its peak

    def describe(self, pp: int) -> str:
        """E.g. "pipeline rank 0 of 35: layers 0-2, the embedding; 35 micro-batches in flight"."""
        ends = [name for name, held in (("the embedding", self.first), ("the output layer", self.last)) if held]
        return (f"pipeline rank {self.index} of {pp}: {_ranges(self.layers)}" + "".join(f", {end}" for end in ends)
                + f"; {self.in_flight:g} micro-batches in flight")


def pipeline_ranks(cfg: RunConfig) -> list[PipelineRank]:
    """Every pipeline rank of the layout, first to last; one rank holding the whole model without a pipeline."""
    p, v = cfg.parallel.pp, cfg.parallel.virtual_stages
    stages = cfg.stage_layers()
    return [PipelineRank(index=r, layers=tuple(layer for chunk in range(v) for layer in stages[chunk * p + r]),
                         first=r == 0, last=r == p - 1, in_flight=micro_batches_in_flight(cfg, r))
            for r in range(p)]


def micro_batches_in_flight(cfg: RunConfig, rank: int) -> float:
    """Micro-batches' worth of activations of its layers that pipeline rank `rank` keeps at once: the
    forwards its schedule runs before the first backward that frees one, plus the one in steady state.

    1F1B (PipeDream-Flush, Narayanan et al. 2021): rank r warms up with p - r - 1 forwards, so it holds
    p - r micro-batches, the first rank p; never more than the m = train.grad_accum there are. With
    p micro-batches of L/p layers each, the first stage keeps L layers' worth, what one unpipelined
    micro-batch keeps (Korthikanti et al. 2022, section 4.2.3).

    Interleaved (v chunks per rank, Megatron's schedule): rank r warms up with 2 (p - r - 1) + (v - 1) p
    chunk-forwards, plus one in steady state, capped at the v m there are; a chunk is 1/v of the rank's
    layers (counted as the average when the split is uneven). On the first rank that is (v p + p - 1) / v
    = p (1 + (p - 1) / (p v)) micro-batches of its layers, Korthikanti et al.'s figure: the interleaved
    schedule keeps (p - 1) / v more chunks' worth than 1F1B, for its smaller bubble.

    Without a pipeline, gradient accumulation runs one micro-batch at a time: 1."""
    p, v, m = cfg.parallel.pp, cfg.parallel.virtual_stages, cfg.train.grad_accum
    if p == 1:
        return 1
    if v == 1:
        return min(m, p - rank)
    return min(v * m, 2 * (p - rank - 1) + (v - 1) * p + 1) / v


def bubble(cfg: RunConfig) -> float:
    """The idle fraction of a step: (p - 1) / (v m + p - 1) (cfg.pipeline_bubble()). The ideal step is the m
    micro-batches' forward and backward; the pipeline fills and drains for (p - 1) / v of them more."""
    return cfg.pipeline_bubble()


def bubble_seconds(cfg: RunConfig, busy_seconds: float) -> float:
    """The idle time the bubble adds to `busy_seconds` of micro-batch work: a step of busy / (1 - bubble)."""
    idle = bubble(cfg)
    return busy_seconds * idle / (1 - idle)


def p2p_bytes_per_step(cfg: RunConfig, message_bytes: float) -> float:
    """What one GPU sends to its neighbouring stages per step. Each micro-batch crosses the p v - 1
    boundaries between (virtual) stages forward as its [s, b, h] activations, and back as their
    gradient: a rank in the middle of the pipeline sends one of each per micro-batch and per chunk it
    holds, 2 v m messages (the first and last ranks a little less). Under sequence parallelism each
    TP rank sends only its 1/t of the sequence; without it every TP rank sends the whole message.
    `message_bytes` is one micro-batch's [s, b, h] at the training precision."""
    p, t = cfg.parallel, cfg.parallel.tp
    if p.pp == 1:
        return 0.0
    per_tp_rank = message_bytes / (t if p.sequence_parallel else 1)
    return 2 * p.virtual_stages * cfg.train.grad_accum * per_tp_rank


def p2p_within_node(cluster: Cluster) -> bool:
    """Neighbouring stages are W/p ranks apart. When a stage's TP x DP ranks fill a node or more, every
    boundary crosses nodes; when several stages share a node, those that straddle two nodes still do,
    and the stages advance in lockstep, so the slowest boundary paces them: the network whenever the
    job has more than one node."""
    return cluster.nodes == 1


def _ranges(layers: tuple[int, ...]) -> str:
    """Layer indices as runs: "layers 0-2", "layers 0-1, 8-9", "layer 4"."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    text = ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}" for run in runs)
    return ("layer " if len(layers) == 1 else "layers ") + text
