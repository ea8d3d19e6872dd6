"""What a rank's checkpoint saves cost its host. A save copies the fp32 masters and both Adam moments
of what the rank writes into host buffers that stay allocated, pinned on a GPU, from one save to the
next (parallel/checkpoint/layout_free.py's held_pieces): host RAM that a node needs beside whatever
else it runs, and which a rank's GPU memory plan does not show.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.config import RunConfig
    from launcher.plan.count import ParameterCount

SAVED_BYTES_PER_PARAMETER = 12  # fp32 master and both Adam moments, in every training precision


def checkpoint_host_bytes(cfg: RunConfig, count: ParameterCount, dp: int) -> float:
    """A rank writes 1/dp of the dense parameters it holds (its ZeRO partition, or at ZeRO-0 the whole
    parameters it is the one writer of) and 1/(dp / ep) of its experts, which are replicated over fewer
    ranks."""
    dense, experts = count.per_rank - count.experts_per_rank, count.experts_per_rank
    return SAVED_BYTES_PER_PARAMETER * (dense / dp + experts / (dp // cfg.parallel.ep))
