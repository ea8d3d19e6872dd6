"""Masked language modelling, the pretraining objective of BERT (Devlin et al. 2019) and RoBERTa (Liu et al. 2019).

A window is data.seq_len packed tokens, documents joined by end-of-document as RoBERTa's "full
sentences" are. Of its tokens that are not special, `probability` are chosen: that share of each
window, rounded up or down at random so that it holds on average, and at least one token when there
is any to choose, so that no batch has nothing to score. Of the chosen tokens, `mask_fraction` become
the mask token, `random_fraction` a token drawn uniformly from the non-special vocabulary, and the
rest stay as they were. The labels are the chosen tokens' originals, IGNORE_INDEX elsewhere.

Special tokens (end-of-document, pad, the mask, T5's sentinels, whatever the tokenizer marks
special) are never chosen and never drawn: predicting the separator would teach nothing, and a drawn
one would plant a document boundary or a mask that is not one. With `whole_word`, a word is chosen
whole or not at all, words as a byte-level BPE marks them: a word starts at a token whose text starts
with the space marker 'Ġ'. A window's first token, and a token after a special one, start words too,
since nothing before them in the window belongs to their word.

Masking is dynamic, as RoBERTa's: a window is masked anew at each epoch. Yet the mask is a pure
function of (run seed, window identity, epoch), drawn from a generator seeded by their hash, so a
resumed or resharded run masks every window as the uninterrupted run does, with no random state to
checkpoint:
- a window's identity is its tokens, as for span corruption (data_pipeline/span_corruption.py).
  Its place in a lane's stream would not do: which lane makes which window, and in which order,
  depends on the DP size, the worker count and the reshards; the tokens a window holds do not.
- its epoch is that of its first token: the pass over the source that the token's document was read
  in, visit // shards (data_pipeline/work.py). It is a property of the document, the same at every
  layout, and lanes carry it with their packed tokens through checkpoints and reshards.
Two windows of the same tokens in the same epoch (a licence header repeated, say) share a mask,
which costs nothing. Evaluation masks every held-out window as EVALUATION_EPOCH, an epoch training
never reaches, so each evaluation scores the same masks at every layout (data_pipeline/validation.py).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy
from tokenizers import Tokenizer

from .config import DataConfig
from .errors import DataError
from .span_corruption import IGNORE_INDEX
from .tokenizer import tokenizer_path
from .work import TOKEN_TYPE

WORD_START = "Ġ"  # byte-level BPE's space: a token whose text starts with it starts a word
EVALUATION_EPOCH = -1  # the epoch every evaluation masks held-out windows as


@dataclass(frozen=True)
class MaskedLM:
    """Turns windows of tokens into input_ids and labels; its id tables come from the tokenizer (for_run)."""

    probability: float
    mask_fraction: float
    random_fraction: float
    mask: int
    special: tuple[int, ...]  # never chosen, never drawn
    vocab_size: int
    word_continuations: tuple[int, ...] | None  # ids that continue the word before them; None: token by token
    seed: int

    @classmethod
    def for_run(cls, cfg: DataConfig, tokenizer: Tokenizer, seed: int) -> MaskedLM | None:
        """data.masked_lm for `tokenizer`, or None when the run does not mask. Refuses a tokenizer without
        the mask token, and whole words with a tokenizer that marks no word starts."""
        objective = cfg.masked_lm
        if objective is None:
            return None
        mask = tokenizer.token_to_id(objective.mask_token)
        if mask is None:
            raise DataError(f"data.tokenizer={tokenizer_path(cfg)} has no mask token {objective.mask_token} "
                            "(data.masked_lm.mask_token) for masked language modelling; set data.masked_lm.mask_token "
                            "to the one it has, or use a tokenizer with one (`parallax prepare-tokenizer` trains one)")
        special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
        special |= {tokenizer.token_to_id(cfg.eod_token), tokenizer.token_to_id(cfg.pad_token), mask}
        continuations = None
        if objective.whole_word:
            vocab = tokenizer.get_vocab()
            if not any(token.startswith(WORD_START) for token, i in vocab.items() if i not in special):
                raise DataError(f"data.masked_lm.whole_word finds words by the byte-level BPE's space marker "
                                f"'{WORD_START}', and no token of data.tokenizer={tokenizer_path(cfg)} starts with it; "
                                "set whole_word to false or use a byte-level BPE tokenizer")
            continuations = tuple(sorted(i for token, i in vocab.items()
                                         if i not in special and not token.startswith(WORD_START)))
        return cls(probability=objective.probability, mask_fraction=objective.mask_fraction,
                   random_fraction=objective.random_fraction, mask=mask, special=tuple(sorted(special)),
                   vocab_size=tokenizer.get_vocab_size(), word_continuations=continuations, seed=seed)

    @cached_property
    def is_special(self) -> numpy.ndarray:
        table = numpy.zeros(self.vocab_size, dtype=bool)
        table[list(self.special)] = True
        return table

    @cached_property
    def replacements(self) -> numpy.ndarray:
        """The ids a chosen token may be replaced by at random."""
        return numpy.flatnonzero(~self.is_special)

    @cached_property
    def continues_word(self) -> numpy.ndarray:
        table = numpy.zeros(self.vocab_size, dtype=bool)
        table[list(self.word_continuations or ())] = True
        return table

    def batch(self, windows: list[numpy.ndarray], epochs: list[int], real: int) -> dict[str, numpy.ndarray]:
        """The first `real` windows masked as in their `epochs`; the rows after them pad a finite run's last
        batch and are not scored."""
        masked = [self(window, epoch) for window, epoch in zip(windows[:real], epochs)]
        input_ids = numpy.stack([inputs for inputs, _ in masked] + list(windows[real:])).astype(numpy.int64)
        labels = numpy.full_like(input_ids, IGNORE_INDEX)
        labels[:real] = [targets for _, targets in masked]
        return {"input_ids": input_ids, "labels": labels}

    def __call__(self, window: numpy.ndarray, epoch: int) -> tuple[numpy.ndarray, numpy.ndarray]:
        """(input_ids, labels) of one window in `epoch`, both as long as the window."""
        tokens = numpy.ascontiguousarray(window, dtype=TOKEN_TYPE)  # the same bytes, so the same mask, from any caller
        digest = hashlib.blake2b(tokens.tobytes(), digest_size=8, key=f"{self.seed}/{epoch}".encode()).digest()
        rng = numpy.random.default_rng(int.from_bytes(digest, "little"))
        positions = numpy.flatnonzero(self.choose(tokens, rng))
        action = rng.random(len(positions))
        drawn = self.replacements[rng.integers(len(self.replacements), size=len(positions))]
        replaced = action < self.mask_fraction + self.random_fraction  # the rest are left unchanged
        inputs = tokens.astype(numpy.int64)
        inputs[positions[replaced]] = numpy.where(action < self.mask_fraction, self.mask, drawn)[replaced]
        labels = numpy.full(len(tokens), IGNORE_INDEX, dtype=numpy.int64)
        labels[positions] = tokens[positions]
        return inputs, labels

    def choose(self, tokens: numpy.ndarray, rng: numpy.random.Generator) -> numpy.ndarray:
        """Boolean [len(tokens)]: the tokens to predict."""
        candidates = ~self.is_special[tokens]
        count = int(candidates.sum())
        if not count:
            return candidates
        wanted = max(1, int(count * self.probability + rng.random()))  # rounded at random: the share holds on average
        if self.word_continuations is not None:
            return self.choose_words(tokens, candidates, wanted, rng)
        chosen = numpy.zeros(len(tokens), dtype=bool)
        chosen[rng.choice(numpy.flatnonzero(candidates), size=wanted, replace=False)] = True
        return chosen

    def choose_words(self, tokens: numpy.ndarray, candidates: numpy.ndarray, wanted: int,
                     rng: numpy.random.Generator) -> numpy.ndarray:
        """Whole words, in random order, up to `wanted` tokens: as BERT's whole-word masking, a word that would
        overshoot is passed over for a shorter one. When every word is longer than `wanted`, one is chosen
        anyway, so that the window has something to score."""
        after_candidate = numpy.concatenate([[False], candidates[:-1]])
        starts = candidates & ~(self.continues_word[tokens] & after_candidate)
        word_of = numpy.cumsum(starts) - 1  # the word of each candidate (the first candidate always starts one)
        sizes = numpy.bincount(word_of[candidates])
        order = rng.permutation(len(sizes))
        picked, taken = numpy.zeros(len(sizes), dtype=bool), 0
        for word in order:
            if taken + sizes[word] <= wanted:
                picked[word], taken = True, taken + sizes[word]
                if taken == wanted:
                    break
        if not taken:
            picked[order[0]] = True
        return candidates & picked[word_of]
