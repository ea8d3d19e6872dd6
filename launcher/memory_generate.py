"""`parallax generate` for a recurrent memory model (model.memory): Parallax's own GPT decodes, since
transformers has no RMT to be its twin (docs/memory.md).

The text is read as the model was trained to read it, a segment of model.memory.segment_len tokens at a
time (GPT.read_segment): each full segment writes the memory the next one reads. The segment being filled
(the prompt's last, then the new tokens) is run again whole, with the memory it reads, for each token it
predicts; once full, its memory is written and a new segment starts. There is no KV cache to keep: a segment
with its memory fits model.max_seq_len, and the memory it reads does not change while it fills. What is
held is that memory and one segment's ids, however long the text, so a prompt may be far longer than
model.max_seq_len, and each new token costs one segment's forward.

The sampling is the one transformers does for the other models (launcher/generate.py): greedy at
temperature 0, else the softmax at the temperature, cut to the top-k tokens and then to the top-p mass,
in transformers' order; the end-of-text token (data.eod_token) ends the text.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

import torch

if TYPE_CHECKING:
    from launcher.generate import Sampling
    from launcher.twin_checkpoint import CheckpointModel
    from models.gpt import GPT


@dataclass
class MemoryModel:
    gpt: GPT  # in eval mode
    vocab_size: int  # the true vocabulary: the padding rows of the output layer are never sampled


@contextmanager
def loaded(checkpoint: CheckpointModel, device: torch.device) -> Iterator[MemoryModel]:
    """The checkpoint's model, while the block runs: megatron's layers need a (one-process) world around them."""
    from models.gpt import GPT
    from parallel.checkpoint import read_weights
    from parallel.topology import single_process_world

    with single_process_world():
        with torch.device(device):
            gpt = GPT(checkpoint.cfg.model, checkpoint.vocab_size)
        gpt.load_state_dict(read_weights(checkpoint.path))
        yield MemoryModel(gpt.eval(), checkpoint.vocab_size)


@torch.no_grad()
def continuation(model: MemoryModel, prompt_ids: list[int], sampling: Sampling, end: Optional[int]) -> list[int]:
    """The new tokens after `prompt_ids`: sampling.max_new_tokens, or fewer ending with the end-of-text `end`.
    Sampling draws from torch's global generator, which the caller seeds."""
    gpt, segment_len = model.gpt, model.gpt.cfg.memory.segment_len
    as_input = lambda ids: torch.tensor([ids], device=gpt.memory.weight.device)  # noqa: E731
    last = (len(prompt_ids) - 1) // segment_len * segment_len  # where the prompt's last token's segment starts
    memory = gpt.initial_memory(1)
    for start in range(0, last, segment_len):  # the segments before it only write memory
        memory = gpt.read_segment(as_input(prompt_ids[start:start + segment_len]), memory)[1]
    segment, new = list(prompt_ids[last:]), []
    while len(new) < sampling.max_new_tokens and (not new or new[-1] != end):
        x, written = gpt.read_segment(as_input(segment), memory)
        new.append(sample(gpt.head(x[-1:])[0, 0, :model.vocab_size], sampling))
        if len(segment) == segment_len:  # full: the memory it wrote is the next segment's
            memory, segment = written, []
        segment.append(new[-1])
    return new


def sample(logits: torch.Tensor, sampling: Sampling) -> int:
    """The next token from one position's logits [vocab]: the most likely at temperature 0, else drawn from the
    softmax at the temperature over the top_k most likely tokens (0: all), then over the fewest most likely
    that hold probability top_p (the most likely always stays)."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        probs, order = logits.softmax(-1).sort(descending=True)
        logits[order[probs.cumsum(-1) - probs >= sampling.top_p]] = float("-inf")  # the mass before already holds it
    return int(torch.multinomial(logits.softmax(-1), 1))
