"""What one training sequence runs through the model: the passes through the blocks and the positions scored.

A plain decoder runs its data.seq_len tokens through every block once, s queries over s keys. With recurrent
memory (model.memory, docs/memory.md) the window is n = seq_len / L segments, and each runs through every
block as [read memory; L tokens; write memory]: n passes of L + 2M positions, each attending over its own
L + 2M keys (GPT.read_segment, with memory_attention_mask). Only scored positions reach the output layer
(GPT.score_segment): every token of a corpus window, one answer token of a data.fact_task sample. The memory
each segment writes goes through the final norm too (GPT.read_segment).

All n passes are one autograd graph whatever bptt_segments says: truncated BPTT detaches the memory an early
segment reads, but that segment's own loss is part of the window's loss, so its activations are kept until
the window's one backward (GPT.forward_with_memory; measured in tests/distributed/scenarios_plan.py).

With train.memory_curriculum the plan takes the curriculum's longest input, which decides whether a layout
fits; earlier steps run fewer segments.
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
    tokens: int  # the data tokens of a sequence
    memory_written: int = 0  # memory positions through the final norm (every segment's write memory)

    @property
    def positions(self) -> int:
        """Positions through every block per sequence."""
        return self.passes * self.span


def window(cfg: RunConfig, memory_tokens: bool = True) -> Window:
    """cfg's longest training sequence (train.memory_curriculum's last count of segments; data.fact_task's
    samples are that long, corpus windows are cut to it); with `memory_tokens=False`, the same segments without
    their memory tokens (the baseline the memory tokens' overhead is measured against)."""
    memory, curriculum = cfg.model.memory, cfg.train.memory_curriculum
    if memory is None and cfg.data.fact_task is None:
        return Window(passes=1, span=cfg.data.seq_len, scored=cfg.data.seq_len, tokens=cfg.data.seq_len)
    segment = cfg.task_segment_len()  # without memory (data.fact_task's baseline), a segment is one window
    tokens = segment * (max(curriculum.segments) if curriculum else cfg.data.seq_len // segment)
    if memory is None:  # the whole input is one sequence, every position through the output layer
        return Window(passes=1, span=tokens, scored=tokens, tokens=tokens)
    # data.fact_task scores one answer token per sample, and only scored positions reach the output layer.
    return Window(passes=tokens // segment, span=segment + (2 * memory.num_mem_tokens if memory_tokens else 0),
                  scored=1 if cfg.data.fact_task else tokens, tokens=tokens,
                  memory_written=tokens // segment * memory.num_mem_tokens if memory_tokens else 0)
