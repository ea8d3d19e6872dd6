"""What one training sequence runs through the model: the passes through the blocks and the positions scored.

A plain decoder runs its data.seq_len tokens through every block once, s queries over s keys. With recurrent
memory (model.memory, docs/memory.md) the window is n = seq_len / L segments, and each runs through every
block as [read memory; L tokens; write memory]: n passes of L + 2M positions, each attending over its own
L + 2M keys (GPT.read_segment, with memory_attention_mask). Only scored positions reach the output layer
(GPT.score_segment): every token of a corpus window, so seq_len of them either way.

All n passes are one autograd graph whatever bptt_segments says: truncated BPTT detaches the memory an early
segment reads, but that segment's own loss is part of the window's loss, so its activations are kept until
the window's one backward (GPT.forward_with_memory; measured in tests/distributed/scenarios_plan.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.config import RunConfig


@dataclass(frozen=True)
class Window:
    passes: int  # separate runs through every block per sequence: the segments
    span: int  # positions of one pass, each attending over (up to) all of them
    scored: int  # positions through the output layer

    @property
    def positions(self) -> int:
        """Positions through every block per sequence."""
        return self.passes * self.span


def window(cfg: RunConfig, memory_tokens: bool = True) -> Window:
    """cfg's training window; with `memory_tokens=False`, the same segments without their memory tokens (the
    baseline the memory tokens' overhead is measured against)."""
    s, memory = cfg.data.seq_len, cfg.model.memory
    if memory is None:
        return Window(passes=1, span=s, scored=s)
    span = memory.segment_len + (2 * memory.num_mem_tokens if memory_tokens else 0)
    return Window(passes=s // memory.segment_len, span=span, scored=s)
