"""The `data:` section of the run YAML."""

import math
import os
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


EOD = "<|endoftext|>"  # Parallax's own names, which `parallax prepare-tokenizer` trains
PAD = "<pad>"
MASK = "<mask>"  # what masked language modelling puts in place of most chosen tokens
NUM_SENTINELS = 100  # T5 span corruption masks with <extra_id_0> ... <extra_id_99>


class SpecialTokens(NamedTuple):
    """The tokens the pipeline inserts, by name, as a run's data.eod_token and data.pad_token give them:
    Hugging Face tokenizers name theirs otherwise (Llama's documents end with `</s>`), and an exported
    model must say which of its tokens these are (its eos and pad)."""

    eod: str = EOD  # between documents
    pad: str = PAD  # a finite run's last batch; T5's decoder start
    mask: str = MASK  # what masked language modelling puts in place of a chosen token (data.masked_lm.mask_token)


def default_cache_dir() -> Path:
    """Built-in corpus and tokenizer live here so every run after the first starts instantly."""
    return Path(os.environ.get("PARALLAX_CACHE", Path.home() / ".cache" / "parallax"))


class SourceConfig(BaseModel):
    """One corpus: a file or a directory of files, each file being one shard; or (format "tokenized") the
    PREFIX of a PREFIX.bin/PREFIX.idx pair that `parallax tokenize` or Megatron's preprocessing wrote."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    weight: float = 1.0
    format: Literal["text", "jsonl", "parquet", "tokenized"] | None = Field(
        default=None, description="None infers it per file from the extension (.jsonl/.json, .parquet, else text); "
        "tokenized: path is a .bin/.idx prefix, read by mmap with no tokenizing."
    )
    text_field: str = "text"

    @field_validator("weight")
    @classmethod
    def _weight_positive(cls, weight: float) -> float:
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a positive number, got {weight}; give every source a weight > 0")
        return weight


class SpanCorruptionConfig(BaseModel):
    """T5's pretraining objective (data_pipeline/span_corruption.py); data.seq_len is then the encoder's input length."""

    model_config = ConfigDict(extra="forbid")

    noise_density: float = Field(0.15, gt=0, lt=1, description="fraction of the tokens masked")
    mean_noise_span_length: float = Field(3.0, ge=1, description="average tokens per masked span")


class MaskedLMConfig(BaseModel):
    """BERT's and RoBERTa's pretraining objective (data_pipeline/masked_lm.py): data.seq_len tokens in, the chosen
    tokens' originals out. Of the chosen tokens, mask_fraction become the mask token, random_fraction a random
    token, and the rest stay as they are, so the model cannot learn that only masked positions are scored."""

    model_config = ConfigDict(extra="forbid")

    probability: float = Field(0.15, gt=0, lt=1,
                               description="fraction of the (non-special) tokens chosen for prediction")
    mask_fraction: float = Field(0.8, ge=0, le=1,
                                 description="of the chosen tokens, the fraction replaced by mask_token")
    random_fraction: float = Field(0.1, ge=0, le=1, description="of the chosen tokens, the fraction replaced by a "
                                   "random non-special token; the rest are left unchanged")
    whole_word: bool = Field(False, description="choose whole words, as the byte-level BPE marks them (a token "
                             "starting with 'Ġ' starts a word), rather than single tokens")
    mask_token: str = Field(MASK, description="the tokenizer's mask token")

    @model_validator(mode="after")
    def _fractions_fit(self) -> "MaskedLMConfig":
        if self.mask_fraction + self.random_fraction > 1:
            raise ValueError(f"mask_fraction={self.mask_fraction} and random_fraction={self.random_fraction} add up "
                             "to more than 1; they are shares of the chosen tokens, the rest left unchanged")
        return self


class FactTaskConfig(BaseModel):
    """The built-in long-context task for recurrent memory (data_pipeline/fact_task.py): retrieve a fact
    planted in corpus text from the question at the end. Replaces the corpus windows as training data."""

    model_config = ConfigDict(extra="forbid")

    values: int = Field(10, ge=2, le=10, description="the answer is one of the digits 0..values-1, so a model that "
                        "cannot see the fact is right 1/values of the time")
    position: Literal["random", "start"] = Field(
        "random", description="random: the fact sits anywhere in any segment but the last (Detect & Memorize); "
        "start: at the start of the first segment (Memorize)")
    eval_samples: int = Field(200, ge=1, description="held-out samples each evaluation scores, per segment count")
    eval_segments: list[int] | None = Field(
        None, description="the segment counts each evaluation scores (`parallax eval --segments`); default: the "
        "longest input training reaches")

    @field_validator("eval_segments")
    @classmethod
    def _counts_positive(cls, counts: list[int] | None) -> list[int] | None:
        if counts is not None and (not counts or min(counts) < 1):
            raise ValueError(f"eval_segments={counts}: give one or more segment counts, each 1 or more")
        return counts


class DataConfig(BaseModel):
    """Everything the pipeline needs; the run YAML's `data:` section validates into this."""

    model_config = ConfigDict(extra="forbid")

    seq_len: int = 128
    sources: list[SourceConfig] | None = Field(
        default=None, description="None or [] trains on the built-in corpus made from the Python standard library."
    )
    tokenizer: Path | None = Field(
        default=None, description="A tokenizer.json; None builds (once, then caches) a BPE on the built-in corpus."
    )
    tokenizer_check: bool = Field(
        True, description="Refuse a tokenized source whose PREFIX.meta.json names another tokenizer than "
        "data.tokenizer, or has none. false: trust a corpus made elsewhere (Megatron's preprocessing) to use its ids.")
    vocab_size: int = 8192
    eod_token: str = Field(
        EOD, description="The tokenizer's end-of-document token, packed between documents (a model's eos, e.g. "
        "Llama's </s>); model.init_from takes the directory's eos_token.")
    pad_token: str = Field(
        PAD, description="The tokenizer's padding token, for a finite run's last batch and T5's decoder start; may "
        "be data.eod_token (Llama has no pad). model.init_from takes the directory's pad_token, else its eos_token.")
    shuffle_buffer: int = 1000
    num_workers: int = 1
    epochs: int | None = Field(
        default=None, description="None loops forever (training); N stops each rank after N passes (evaluation)."
    )
    cache_dir: Path = Field(default_factory=default_cache_dir)
    span_corruption: SpanCorruptionConfig | None = Field(
        default=None, description="T5's objective; model.arch=t5 sets the defaults when absent. None: next-token windows."
    )
    masked_lm: MaskedLMConfig | None = Field(
        default=None, description="BERT's objective, masked language modelling, on windows of data.seq_len tokens. "
        "None: next-token windows.")
    fact_task: FactTaskConfig | None = Field(
        default=None, description="Train and evaluate on the built-in long-context task (needs model.memory); "
        "its filler text comes from the sources. None: next-token windows of the sources.")
    validation: list[SourceConfig] | None = Field(
        default=None, description="Held-out sources for evaluation; None holds out validation_fraction of the "
        "training sources' documents instead (the built-in corpus included)."
    )
    validation_fraction: float = Field(
        0.03, ge=0, lt=1, description="With no data.validation: the share of documents, chosen by a hash of each "
        "document's file name and record index, that training never reads and evaluation reads. 0 holds none out."
    )

    @property
    def special_tokens(self) -> SpecialTokens:
        mask = self.masked_lm.mask_token if self.masked_lm is not None else MASK
        return SpecialTokens(self.eod_token, self.pad_token, mask)

    @model_validator(mode="after")
    def _one_objective(self) -> "DataConfig":
        chosen = [name for name in ("span_corruption", "masked_lm", "fact_task") if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise ValueError(f"data.{' and data.'.join(chosen)} are different training objectives; keep one")
        return self

    @field_validator("seq_len", "vocab_size", "shuffle_buffer", "epochs")
    @classmethod
    def _positive(cls, value: int | None, info) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"{info.field_name} must be a positive integer, got {value}; set data.{info.field_name} to 1 or more")
        return value

    @field_validator("num_workers")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"num_workers must be 0 (read in the training process) or more, got {value}")
        return value
