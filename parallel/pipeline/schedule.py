"""Pipeline schedules: the order in which one pipeline rank runs the forward and backward passes of
each micro-batch through each model chunk it holds.

A schedule is data, a list of `Action`s per rank, computed from (pp, virtual_stages, micro-batches,
rank) alone, so it can be read, printed and checked without a process group (tests/test_pipeline_
schedule.py runs every rank's list against the others' and shows that each completes).

1F1B (Narayanan et al. 2021, PipeDream-Flush): rank r first runs p - r - 1 forwards (warm-up), then
alternates one forward with one backward, then runs the backwards left (cool-down). It idles for the
same (p - 1) / (m + p - 1) of a step as GPipe, but holds at most p micro-batches' activations, not m.

Interleaved 1F1B (same paper, section 2.2): with v virtual stages per rank, rank r holds model chunks
r, r + p, r + 2p, ... of the p x v stages. Micro-batches go through in groups of p, chunk by chunk,
so the bubble shrinks v-fold, to (p - 1) / (v x m + p - 1), for v times the point-to-point messages.
Its warm-up is longer, 2 (p - r - 1) + (v - 1) p forwards, to fill every chunk before the first
backward can start.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Action:
    kind: Literal["forward", "backward"]
    micro_batch: int
    chunk: int  # which of this rank's model chunks: virtual stage chunk x pp + rank


def virtual_stage(chunk: int, rank: int, pp: int) -> int:
    return chunk * pp + rank


def one_f_one_b(pp: int, virtual_stages: int, micro_batches: int, rank: int) -> list[Action]:
    """Rank `rank`'s actions for one optimizer step: 1F1B, or interleaved 1F1B with virtual_stages > 1
    (which needs micro_batches to be a multiple of pp)."""
    v, m = virtual_stages, micro_batches
    total = m * v
    if v == 1:
        warmup = min(pp - rank - 1, m)
    else:
        assert m % pp == 0, "the interleaved schedule runs micro-batches in groups of pp"
        warmup = min(2 * (pp - rank - 1) + (v - 1) * pp, total)
    forwards = [_nth(k, pp, v, forward=True) for k in range(total)]
    backwards = [_nth(k, pp, v, forward=False) for k in range(total)]
    actions = forwards[:warmup]
    for k in range(total - warmup):
        actions += [forwards[warmup + k], backwards[k]]
    return actions + backwards[total - warmup:]


def forward_only(pp: int, virtual_stages: int, micro_batches: int, rank: int) -> list[Action]:
    """Evaluation: every micro-batch forward, in groups of pp through each chunk in turn, as training
    runs them; any number of micro-batches (the last group may be short). Every rank runs them in
    the same order, and forwards wait only on earlier forwards, so no rank waits on a later one."""
    return [Action("forward", micro_batch, chunk)
            for group in range(0, micro_batches, pp) for chunk in range(virtual_stages)
            for micro_batch in range(group, min(group + pp, micro_batches))]


def _nth(k: int, pp: int, v: int, forward: bool) -> Action:
    """The k-th forward (or backward) of a rank: micro-batches in groups of pp, each group through
    chunk 0, 1, ..., v - 1 going forward and back down from chunk v - 1 coming back."""
    group, within = divmod(k, pp * v)
    chunk = within // pp
    micro_batch = group * pp + within % pp
    if forward:
        return Action("forward", micro_batch, chunk)
    return Action("backward", micro_batch, v - 1 - chunk)
