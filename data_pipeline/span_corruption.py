"""T5's span-corruption objective (Raffel et al. 2020, section 3.1.4).

A window of raw tokens is split into alternating kept and noise spans: about `noise_density` of
the tokens are noise, in spans of `mean_noise_span_length` on average. The encoder input is the
kept tokens with each noise span replaced by one sentinel, <extra_id_0>, <extra_id_1>, ... in
order; the target is each sentinel followed by the span it replaced. Both end with end-of-document.

Lengths are T5's: the raw window is the longest one whose corrupted input still fits
`inputs_length`, and since the numbers of noise tokens and spans depend on the window length only,
every window gives an input of exactly `inputs_length` tokens and a target of exactly
`targets_length`, so packed batches need no padding.

The noise mask of a window is drawn from a generator seeded by the run's seed and the window's
own tokens: a pure function of the data, so it is the same after a resume or a reshard without
any state in the checkpoint.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy

from .errors import DataError

IGNORE_INDEX = -100  # target positions that are not scored: the rows padding a finite run's last batch


def corrupted_lengths(raw_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(input length, target length) after corrupting `raw_length` tokens: kept tokens plus one
    sentinel per span plus end-of-document; noise tokens plus one sentinel per span plus end-of-document."""
    noise, spans = _noise_tokens_and_spans(raw_length, noise_density, mean_noise_span_length)
    return raw_length - noise + spans + 1, noise + spans + 1


def _noise_tokens_and_spans(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    noise = min(max(round(length * noise_density), 1), length - 1)  # at least one token kept, one masked
    return noise, max(round(noise / mean_noise_span_length), 1)


@dataclass(frozen=True)
class SpanCorruption:
    """Turns windows of `raw_length` tokens into encoder inputs, decoder inputs and labels."""

    inputs_length: int
    noise_density: float
    mean_noise_span_length: float
    sentinels: tuple[int, ...]  # token ids of <extra_id_0>, <extra_id_1>, ...
    eod: int
    pad: int  # also the decoder's start token, as in T5
    seed: int

    @property
    def raw_length(self) -> int:
        """The longest window whose corrupted input fits inputs_length (T5's random_spans_helper)."""
        length = self.inputs_length - 1
        while corrupted_lengths(length + 1, self.noise_density, self.mean_noise_span_length)[0] <= self.inputs_length:
            length += 1
        return length

    @property
    def targets_length(self) -> int:
        return corrupted_lengths(self.raw_length, self.noise_density, self.mean_noise_span_length)[1]

    def check(self) -> None:
        """Refuse lengths that cannot be corrupted exactly, in words naming the setting to change."""
        raw = self.raw_length
        inputs, _ = corrupted_lengths(raw, self.noise_density, self.mean_noise_span_length)
        noise, spans = _noise_tokens_and_spans(raw, self.noise_density, self.mean_noise_span_length)
        if raw < 2 or inputs != self.inputs_length or raw - noise < spans:
            raise DataError(f"data.seq_len={self.inputs_length} is too short for span corruption "
                            f"at noise density {self.noise_density}; use a longer data.seq_len")
        if spans > len(self.sentinels):
            raise DataError(
                f"data.seq_len={self.inputs_length} makes {spans} noise spans but the tokenizer has "
                f"{len(self.sentinels)} sentinel tokens; shorten data.seq_len or raise data.span_corruption.mean_noise_span_length"
            )

    def batch(self, windows: list[numpy.ndarray], real: int) -> dict[str, numpy.ndarray]:
        """Stack corrupted windows; rows past the first `real` pad a finite run's last batch and are not scored."""
        examples = [self(window) for window in windows]
        batch = {name: numpy.stack([e[name] for e in examples]).astype(numpy.int64) for name in examples[0]}
        batch["labels"][real:] = IGNORE_INDEX
        return batch

    def noise_mask(self, length: int, rng: numpy.random.Generator) -> numpy.ndarray:
        """Boolean [length]: alternating kept and noise spans, starting with a kept one. The noise
        tokens are cut into spans at random points, and so are the kept tokens."""
        noise, spans = _noise_tokens_and_spans(length, self.noise_density, self.mean_noise_span_length)
        noise_spans, kept_spans = _random_split(noise, spans, rng), _random_split(length - noise, spans, rng)
        span_lengths = numpy.stack([kept_spans, noise_spans], axis=1).reshape(-1)
        return numpy.repeat(numpy.tile([False, True], spans), span_lengths)

    def __call__(self, window: numpy.ndarray) -> dict[str, numpy.ndarray]:
        """One window of raw_length tokens -> input_ids [inputs_length], decoder_input_ids and labels [targets_length].

        The mask starts with a kept span and alternates, so replacing the noise spans by sentinels
        gives the input, and replacing the kept spans by the same sentinels gives the target with
        each noise span right after its sentinel."""
        digest = hashlib.blake2b(window.tobytes(), digest_size=8, key=str(self.seed).encode()).digest()
        mask = self.noise_mask(len(window), numpy.random.default_rng(int.from_bytes(digest, "little")))
        labels = numpy.append(self._replace_spans(window, ~mask), self.eod)
        return {
            "input_ids": numpy.append(self._replace_spans(window, mask), self.eod),
            "decoder_input_ids": numpy.concatenate([[self.pad], labels[:-1]]),  # shifted right
            "labels": labels,
        }

    def _replace_spans(self, tokens: numpy.ndarray, spans: numpy.ndarray) -> numpy.ndarray:
        """tokens with each run of True in `spans` replaced by the next sentinel."""
        starts = spans & ~numpy.concatenate([[False], spans[:-1]])
        sentinels = numpy.asarray(self.sentinels)[(numpy.cumsum(starts) - 1).clip(min=0)]
        return numpy.where(starts, sentinels, tokens)[~spans | starts]


def _random_split(items: int, segments: int, rng: numpy.random.Generator) -> numpy.ndarray:
    """Lengths of `segments` non-empty runs that add up to `items`, every split equally likely."""
    cuts = numpy.sort(rng.choice(numpy.arange(1, items), size=segments - 1, replace=False))
    return numpy.diff(numpy.concatenate([[0], cuts, [items]]))
