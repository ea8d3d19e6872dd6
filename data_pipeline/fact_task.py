"""The built-in long-context task for recurrent memory (issue 26): answer a question about a fact planted
far back in the input.

After the "Memorize" and "Detect & Memorize" tasks of Bulatov et al. 2023 (arXiv 2304.11062): a fact, "the
code of KEY is VALUE", sits in filler text taken from the corpus, at the start of the first segment
(position: start) or at a random place in a random segment other than the last (random; with one segment,
anywhere before the question). The last segment ends with the question "what is the code of KEY?", and the
label of its last token is the answer, one of `values` digits: the only token scored, so a model that cannot
see the fact is right 1/values of the time however long the input is.

A sample is a function of (seed, its index, its number of segments), built one segment at a time: evaluating
an input of a million tokens holds one segment of it. Training draws its filler from the first
TRAIN_FILLER_TOKENS tokens of the training documents and evaluation from the first EVAL_FILLER_TOKENS of the
held-out ones (data.validation, or the data.validation_fraction share), in the order training reads them; a
sample starts at a random point of its pool and wraps around it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy
import torch

from .config import DataConfig
from .errors import DataError
from .loader import training_plan
from .tokenizer import load_tokenizer, tokenizer_path
from .validation import in_order, validation_plan

KEYS = ("alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma", "theta")
TRAIN_FILLER_TOKENS = 1 << 18
EVAL_FILLER_TOKENS = 1 << 16
IGNORE_INDEX = -100  # an unscored label (Hugging Face's convention, models/blocks.py)


class _Draw(NamedTuple):
    key: int
    value: int
    start: int  # where the filler starts in the pool
    fact_segment: int
    fact_offset: int


@dataclass(frozen=True)
class FactTask:
    filler: numpy.ndarray  # the token pool, int64
    segment_len: int
    position: str
    facts: tuple[numpy.ndarray, ...]  # per key: " the code of KEY is"
    questions: tuple[numpy.ndarray, ...]  # per key: " what is the code of KEY?"
    values: tuple[int, ...]  # the answers' token ids: " 0", " 1", ...
    period: int
    seed: int

    @classmethod
    def build(cls, cfg: DataConfig, segment_len: int, seed: int, held_out: bool) -> FactTask:
        """The task over cfg's sources (held-out documents for evaluation); refused in one line if its phrases
        do not fit a segment or its tokenizer splits a value."""
        task_cfg = cfg.fact_task
        tokenizer = load_tokenizer(cfg)
        encode = lambda text: numpy.array(tokenizer.encode(text).ids, dtype=numpy.int64)  # noqa: E731
        values = [encode(f" {digit}") for digit in range(task_cfg.values)]
        if any(len(value) != 1 for value in values):
            raise DataError(f"data.fact_task: the tokenizer {tokenizer_path(cfg)} splits the answers ' 0'..' "
                            f"{task_cfg.values - 1}' into several tokens; use a tokenizer with one token per digit")
        facts = tuple(encode(f" the code of {key} is") for key in KEYS)
        questions = tuple(encode(f" what is the code of {key}?") for key in KEYS)
        longest = max(len(fact) + 2 for fact in facts) + max(len(question) for question in questions)
        if longest > segment_len:
            raise DataError(f"data.fact_task: a fact and its question take up to {longest} tokens, more than a segment "
                            f"of {segment_len} (model.memory.segment_len); use segments of {longest} tokens or more")
        plan = validation_plan(cfg, seed) if held_out else replace(training_plan(cfg, seed), epochs=1,
                                                                   shuffle_buffer=1)
        filler = corpus_tokens(plan, EVAL_FILLER_TOKENS if held_out else TRAIN_FILLER_TOKENS)
        if len(filler) < segment_len:
            raise DataError(f"data.fact_task: the {'held-out' if held_out else 'training'} documents hold "
                            f"{len(filler)} tokens, less than one segment of filler; add data")
        return cls(filler, segment_len, task_cfg.position, facts, questions,
                   tuple(int(value[0]) for value in values), int(encode(".")[-1]), seed)

    def _draw(self, index: int, segments: int) -> _Draw:
        rng = numpy.random.default_rng([self.seed, index, segments])
        key, value = int(rng.integers(len(self.facts))), int(rng.integers(len(self.values)))
        start = int(rng.integers(len(self.filler)))
        fact_len = len(self.facts[key]) + 2
        if self.position == "start":
            return _Draw(key, value, start, 0, 0)
        if segments == 1:  # the fact must end before the question starts
            room = self.segment_len - len(self.questions[key]) - fact_len
            return _Draw(key, value, start, 0, int(rng.integers(room + 1)))
        return _Draw(key, value, start, int(rng.integers(segments - 1)),
                     int(rng.integers(self.segment_len - fact_len + 1)))

    def answer(self, index: int, segments: int) -> int:
        """The token id of sample `index`'s answer."""
        return self.values[self._draw(index, segments).value]

    def segments(self, index: int, segments: int) -> Iterator[numpy.ndarray]:
        """Sample `index` of `segments` segments, one segment of tokens at a time."""
        draw, length = self._draw(index, segments), self.segment_len
        fact = numpy.concatenate([self.facts[draw.key], [self.values[draw.value], self.period]])
        question = self.questions[draw.key]
        for segment in range(segments):
            tokens = self.filler.take(range(draw.start + segment * length, draw.start + (segment + 1) * length),
                                      mode="wrap")
            if segment == draw.fact_segment:
                tokens[draw.fact_offset:draw.fact_offset + len(fact)] = fact
            if segment == segments - 1:
                tokens[length - len(question):] = question
            yield tokens

    def segment_batches(self, indices: Sequence[int], segments: int) -> Iterator[torch.Tensor]:
        """The samples `indices`, side by side, one segment [b, segment_len] at a time."""
        for rows in zip(*(self.segments(index, segments) for index in indices)):
            yield torch.from_numpy(numpy.stack(rows))

    def batch(self, indices: Sequence[int], segments: int, last_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """The samples `indices` whole, as a model's input_ids and labels [b, segments x segment_len]: every
        label unscored but the last, the answer. `last_tokens`: only the input's last tokens, what a model
        without memory sees of it."""
        input_ids = torch.cat(list(self.segment_batches(indices, segments)), dim=1)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, -1] = torch.tensor([self.answer(index, segments) for index in indices])
        if last_tokens is not None:
            input_ids, labels = input_ids[:, -last_tokens:], labels[:, -last_tokens:]
        return {"input_ids": input_ids, "labels": labels}


def corpus_tokens(plan, count: int) -> numpy.ndarray:
    """The first `count` tokens of `plan`'s documents, in the order training reads them (fewer if they end)."""
    lane, windows, held = in_order(replace(plan, seq_len=4095)), [], 0
    while held < count and (read := lane.next_window()) is not None:
        windows.append(read[0])
        held += len(read[0])
    return numpy.concatenate(windows)[:count].astype(numpy.int64) if windows else numpy.zeros(0, numpy.int64)


class FactTaskLoader:
    """This DP rank's training batches of the task. Step s (from 1) reads the global batch of samples
    (s - 1) x G .. s x G - 1, G = micro_batch x grad_accum x dp, dealt to the ranks as the validation set deals
    its windows, each of segments_at(s) segments. Its state is the steps it has given, so resuming at any
    layout with the same global batch reads what the uninterrupted run would have."""

    def __init__(self, task: FactTask, segments_at: Callable[[int], int], *, micro_batch_size: int, grad_accum: int,
                 dp_rank: int, dp_size: int, last_tokens: int | None):
        self.task, self.segments_at, self.last_tokens = task, segments_at, last_tokens
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.micro_batches = 0

    def __iter__(self) -> FactTaskLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        step, accum = divmod(self.micro_batches, self.grad_accum)
        global_batch = self.micro_batch_size * self.grad_accum * self.dp_size
        first = step * global_batch + (accum * self.dp_size + self.dp_rank) * self.micro_batch_size
        self.micro_batches += 1
        return self.task.batch(range(first, first + self.micro_batch_size), self.segments_at(step + 1),
                               self.last_tokens)

    def state_dict(self) -> dict:
        return {"fact_task_steps": self.micro_batches // self.grad_accum}

    def load_state_dict(self, states: Sequence[dict]) -> None:
        """Every DP rank saved the same step count: the first one's is read."""
        if "fact_task_steps" not in states[0]:
            raise DataError("the checkpoint's data state is the corpus loader's, not data.fact_task's: resume it "
                            "without data.fact_task, or start afresh with --resume none")
        self.micro_batches = states[0]["fact_task_steps"] * self.grad_accum
