"""The run configuration: one YAML file, one typed schema, dotted overrides from the command line.

Every section is validated as it loads, and every failure becomes a `ConfigError` whose message is
one line naming the field and what to do; the CLI prints it and exits non-zero, with no traceback.
"""
from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, TypeAdapter, ValidationError,
                      field_validator, model_validator)

from data_pipeline import DataConfig, DataError
from data_pipeline.config import NUM_SENTINELS, MaskedLMConfig, SpanCorruptionConfig
from data_pipeline.span_corruption import SpanCorruption
from models.config import ModelConfig


class ConfigError(ValueError):
    """A run configuration that cannot work; the message is the one line the user sees."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParallelConfig(_Section):
    tp: PositiveInt = Field(1, description="tensor-parallel size")
    ep: PositiveInt = Field(1, description="expert-parallel size, carved out of the data-parallel ranks")
    pp: PositiveInt = Field(1, description="pipeline-parallel size: the layers are split into this many stages, "
                            "each on its own ranks, and train.grad_accum micro-batches flow through them (1F1B)")
    virtual_stages: PositiveInt = Field(
        1, description="model chunks per pipeline rank: above 1, the interleaved 1F1B schedule (Narayanan et al. "
        "2021), whose bubble is this many times smaller, for as many times more point-to-point messages")
    pipeline_layers: Optional[list[PositiveInt]] = Field(
        None, description="layers of each (virtual) stage, in order, pp x virtual_stages numbers summing to "
        "model.num_layers; default: as even as can be, the first stages taking one more")
    zero_stage: Literal[0, 1, 2, 3] = 1
    sequence_parallel: bool = False
    activation_checkpointing: bool = False
    timeout_minutes: float = Field(
        30, gt=0, description="a collective that waits this long (a dead or hung peer) fails the run instead of "
        "holding every GPU of the job until the time limit")


class OptimConfig(_Section):
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    warmup_steps: NonNegativeInt = 20
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="global gradient-norm clip; 0 disables")

    @model_validator(mode="after")
    def _min_lr_below_lr(self):
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr} is above optim.lr={self.lr}; lower min_lr")
        return self


class TrainConfig(_Section):
    steps: PositiveInt = 300
    micro_batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 1234
    stop_at_step: Optional[PositiveInt] = Field(
        None, description="end this launch after this step with a checkpoint, as a preemption would; "
        "for splitting a run into jobs shorter than a queue's time limit",
    )
    eval_interval: NonNegativeInt = Field(
        0, description="evaluate on the validation set before the first step, every this many steps and after "
        "the last; 0: never")
    eval_batches: PositiveInt = Field(
        10, description="global batches of the validation set each evaluation reads (the same ones every time)")
    memory_curriculum: Optional[MemoryCurriculumConfig] = Field(
        None, description="recurrent memory: grow the segments of a training sample over training; none: every "
        "sample has data.seq_len / model.memory.segment_len segments")
    max_bad_steps: PositiveInt = Field(
        10, description="stop the run after this many steps in a row skipped for a non-finite loss or gradient "
        "norm (each is skipped on every rank, the weights untouched)")
    skip_batches: list[tuple[PositiveInt, PositiveInt]] = Field(
        [], description="[first, last] step ranges whose batches are read and dropped, with no update: what a "
        "loss-spike rollback does, given from the start (e.g. to rerun past a bad stretch of data)")
    spike: Optional[SpikeConfig] = Field(
        None, description="roll back to the last checkpoint on a loss spike and skip the batches that led to it; "
        "none: no rollback")
    hang_seconds: float = Field(
        600, ge=0, description="a step phase, collective or save that makes no progress this long writes every "
        "rank's stacks to <run_dir>/hang/ and ends the run (exit 76); 0: never. Keep it below "
        "parallel.timeout_minutes, and above the longest save or evaluation")
    profile_steps: Optional[tuple[PositiveInt, PositiveInt]] = Field(
        None, description="[first, last]: torch.profiler traces of these steps into <run_dir>/tensorboard (its "
        "profile plugin), and on CUDA a memory snapshot; none: nothing is recorded")

    @field_validator("profile_steps")
    @classmethod
    def _profile_range(cls, steps: Optional[tuple[int, int]]) -> Optional[tuple[int, int]]:
        if steps is not None and steps[0] > steps[1]:
            raise ValueError(f"[{steps[0]}, {steps[1]}] ends before it starts; give [first, last] steps")
        return steps

    @field_validator("skip_batches")
    @classmethod
    def _ranges_ordered(cls, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for first, last in ranges:
            if first > last:
                raise ValueError(f"[{first}, {last}] ends before it starts; give [first, last] step ranges")
        return ranges


class SpikeConfig(_Section):
    """A loss spike (launcher/spikes.py): a step's loss above `factor` times the median of the `window` good
    steps before it. The run goes back to its newest checkpoint from before the `skip` steps that end at the
    spike, and drops their batches."""

    factor: float = Field(gt=1, description="a spike is a loss above factor x the running median, e.g. 1.5")
    window: PositiveInt = Field(50, description="good steps in the running median; no spike is called before it fills")
    skip: PositiveInt = Field(10, description="the spike's step and the steps before it whose batches are dropped")
    lr_factor: float = Field(1.0, gt=0, le=1, description="after a rollback, train at this fraction of the "
                             "scheduled learning rate for lr_steps steps; 1: as scheduled")
    lr_steps: NonNegativeInt = Field(0, description="how many steps after a rollback train at lr_factor")


class MemoryCurriculumConfig(_Section):
    """How many segments a training sample of a recurrent-memory model has as training goes (launcher/curriculum.py)."""

    segments: list[PositiveInt] = Field(description="the segment counts, in order, e.g. [1, 2, 3, 4]")
    at_steps: list[PositiveInt] = Field(description="the step from which each count applies, the first 1")
    vary_n_segments: bool = Field(
        False, description="each step draws its count uniformly from 1 to the current one (BABILong), so short "
        "inputs stay in the mix")

    @model_validator(mode="after")
    def _steps_fit_segments(self):
        if len(self.segments) != len(self.at_steps):
            raise ValueError(f"train.memory_curriculum: {len(self.segments)} segment counts but {len(self.at_steps)} "
                             "at_steps; give one step for each count")
        if self.at_steps[0] != 1 or any(a >= b for a, b in zip(self.at_steps, self.at_steps[1:])):
            raise ValueError(f"train.memory_curriculum.at_steps={self.at_steps} must start at 1 and increase")
        return self


class LoggingConfig(_Section):
    run_dir: str = "runs/gpt-tiny"
    interval: PositiveInt = 10
    tensorboard: Literal["rank0", "every_rank", "off"] = Field(
        "rank0", description="who writes TensorBoard events under <run_dir>/tensorboard: global rank 0, "
        "every rank (its own figures in rank-NNNNN/), or nobody")
    straggler_factor: float = Field(
        1.5, gt=1, description="name a rank on the console when its own time per step (CPU seconds, outside "
        "collectives) is above this times the median rank's, once per logging interval")
    peak_tflops: Optional[float] = Field(
        None, gt=0, description="peak TFLOP/s per device for MFU; default: the A100/H100/H200 table at "
        "train.precision, or a matmul probe on CPU")


class CheckpointConfig(_Section):
    dir: Optional[str] = Field(None, description="default: <logging.run_dir>/checkpoints")
    interval: NonNegativeInt = Field(100, description="save every this many steps; 0: only at the end and on a stop")
    keep: PositiveInt = Field(3, description="how many of the newest checkpoints to keep")
    resume: str = Field("auto", description="auto: the newest complete checkpoint of dir; none: start afresh; "
                        "or the path of a checkpoint (or of a checkpoints directory)")
    checksum_block_bytes: int = Field(
        1 << 20, ge=4, description="a save checksums each fragment in blocks of about this many bytes (at least one "
        "fp32 number), and a load checks "
        "each block it reads from, whole, so every byte it loads is verified while it reads about one block more "
        "than it needs at each end of each range it reads; smaller blocks, more checksums in each shard's index")


class RunConfig(_Section):
    model: ModelConfig = ModelConfig()
    parallel: ParallelConfig = ParallelConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _layout_fits_model(self):
        tp, m = self.parallel.tp, self.model
        if m.num_heads % tp:
            raise ValueError(
                f"model.num_heads={m.num_heads} is not divisible by parallel.tp={tp}; "
                f"choose parallel.tp from {_divisors(m.num_heads)}"
            )
        if m.kv_heads % tp:
            raise ValueError(
                f"model.num_kv_heads={m.kv_heads} is not divisible by parallel.tp={tp}: each TP rank holds whole "
                f"key/value heads; choose parallel.tp from {_divisors(m.kv_heads)}"
            )
        if m.ffn_size % tp:
            raise ValueError(f"model.ffn_hidden_size={m.ffn_size} is not divisible by parallel.tp={tp}")
        if m.vocab_multiple % tp:
            # the TP sizes that pass every check above (kv_heads divides num_heads)
            fitting = _divisors(math.gcd(m.vocab_multiple, m.kv_heads, m.ffn_size))
            raise ValueError(
                f"model.vocab_multiple={m.vocab_multiple} is not divisible by parallel.tp={tp}: each TP rank holds an "
                f"equal share of the padded vocabulary; choose parallel.tp from {fitting} or set "
                f"model.vocab_multiple to a multiple of {tp}, e.g. {math.lcm(m.vocab_multiple, tp)}"
            )
        if self.train.hang_seconds >= 60 * self.parallel.timeout_minutes:
            raise ValueError(f"train.hang_seconds={self.train.hang_seconds:g} is not below parallel.timeout_minutes="
                             f"{self.parallel.timeout_minutes:g}: a hung collective would fail first, with no stacks; "
                             "lower train.hang_seconds or raise parallel.timeout_minutes")
        if self.train.profile_steps and self.train.profile_steps[1] > self.train.steps:
            raise ValueError(f"train.profile_steps={list(self.train.profile_steps)} ends after train.steps="
                             f"{self.train.steps}; profile steps the run takes")
        if self.data.fact_task is not None and m.arch != "gpt":
            raise ValueError("data.fact_task is a task for decoders (model.arch=gpt, with model.memory); remove it")
        if self.data.masked_lm is not None and m.arch != "bert":
            raise ValueError("data.masked_lm is BERT's objective; remove it or set model.arch=bert")
        if self.data.fact_task is not None and self.parallel.pp > 1:
            raise ValueError(f"data.fact_task with parallel.pp={self.parallel.pp}: its evaluation reads a segment at "
                             "a time through the whole model; set parallel.pp=1")
        if m.arch == "t5":
            self._fit_t5()
        elif self.data.span_corruption is not None:
            raise ValueError("data.span_corruption is T5's objective; remove it or set model.arch=t5")
        elif m.memory is not None:
            self._fit_memory()
        elif self.train.memory_curriculum is not None and self.data.fact_task is None:
            raise ValueError("train.memory_curriculum grows the segments of model.memory; add a model.memory section "
                             "(or data.fact_task, for a baseline without memory), or remove the curriculum")
        elif self.data.seq_len > m.max_seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
                "raise model.max_seq_len or shorten data.seq_len"
            )
        if m.arch == "bert" and self.data.masked_lm is None:  # BERT trains by masked LM, with its defaults
            self.data.masked_lm = MaskedLMConfig()
        ep, moe = self.parallel.ep, m.moe
        if ep > 1 and moe is None:
            raise ValueError(f"parallel.ep={ep} shards experts, but the model has none; add a model.moe section or set parallel.ep=1")
        if moe is not None and moe.num_experts % ep:
            raise ValueError(
                f"model.moe.num_experts={moe.num_experts} is not divisible by parallel.ep={ep}; "
                f"choose parallel.ep from {_divisors(moe.num_experts)}"
            )
        if moe is not None and self.parallel.zero_stage == 3:
            raise ValueError("parallel.zero_stage=3 does not support MoE layers in DeepSpeed; use zero_stage 1 or 2")
        self._fit_pipeline()
        if self.parallel.sequence_parallel and self.data.seq_len % tp and m.memory is None:
            raise ValueError(
                f"parallel.sequence_parallel needs data.seq_len={self.data.seq_len} divisible by parallel.tp={tp}"
            )
        return self

    def _fit_memory(self) -> None:
        """A memory model reads data.seq_len tokens as whole segments (the model bounds each segment by
        model.max_seq_len), and sequence parallelism splits a segment, not the window, over TP. Pipelines are
        refused: the memory would cross every stage in both directions once per segment."""
        mem, p = self.model.memory, self.parallel
        if self.data.seq_len % mem.segment_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} is not a multiple of model.memory.segment_len="
                             f"{mem.segment_len}: a training window is a whole number of segments")
        curriculum = self.train.memory_curriculum
        if curriculum is not None and max(curriculum.segments) * mem.segment_len > self.data.seq_len:
            raise ValueError(f"train.memory_curriculum reaches {max(curriculum.segments)} segments of "
                             f"model.memory.segment_len={mem.segment_len} tokens, more than data.seq_len="
                             f"{self.data.seq_len}; raise data.seq_len to {max(curriculum.segments) * mem.segment_len}")
        if p.pp > 1:
            raise ValueError(f"model.memory with parallel.pp={p.pp}: recurrent memory is not yet built for pipelines; "
                             "set parallel.pp=1")
        segment = mem.segment_len + 2 * mem.num_mem_tokens
        if p.sequence_parallel and segment % p.tp:
            raise ValueError(f"parallel.sequence_parallel splits each segment of model.memory.segment_len="
                             f"{mem.segment_len} + 2 x model.memory.num_mem_tokens={mem.num_mem_tokens} = {segment} "
                             f"positions over parallel.tp={p.tp} ranks; make that sum divisible by it")

    def _fit_pipeline(self) -> None:
        """What a pipeline cannot do is refused here, with what to use instead; its layer split is checked."""
        p, m = self.parallel, self.model
        if p.virtual_stages > 1 and p.pp == 1:
            raise ValueError(f"parallel.virtual_stages={p.virtual_stages} interleaves pipeline stages, but "
                             "parallel.pp=1; set parallel.pp to 2 or more, or virtual_stages=1")
        if p.pp == 1:
            if p.pipeline_layers is not None and p.pipeline_layers != [m.num_layers]:
                raise ValueError("parallel.pipeline_layers splits layers over pipeline stages, but parallel.pp=1; "
                                 "remove it or set parallel.pp")
            return
        if m.arch != "gpt":
            raise ValueError(f"parallel.pp={p.pp}: pipelines are built for decoders (model.arch=gpt); split a "
                             f"model.arch={m.arch} with parallel.tp and parallel.zero_stage=3 instead, and set "
                             "parallel.pp=1")
        if p.zero_stage > 1:
            raise ValueError(f"parallel.zero_stage={p.zero_stage} with parallel.pp={p.pp}: ZeRO-2/3 partition "
                             "gradients as each backward runs, which a pipeline runs once per micro-batch and "
                             "stage; use parallel.zero_stage=1 (optimizer states sharded over DP, as Megatron's "
                             "distributed optimizer does with pipelines) or 0")
        if self.train.precision == "fp16":
            raise ValueError(f"train.precision=fp16 with parallel.pp={p.pp}: the loss scale is applied at the last "
                             "stage only; use train.precision=bf16")
        if self.train.precision == "bf16" and p.zero_stage == 0 and m.tied:
            raise ValueError(f"train.precision=bf16 at parallel.zero_stage=0 with parallel.pp={p.pp} and a tied "
                             "embedding: DeepSpeed's bf16 ZeRO-0 optimizer norms gradients flattened, so it would "
                             "count the last stage's copy of the embedding twice; use parallel.zero_stage=1")
        stages = p.pp * p.virtual_stages
        if p.pipeline_layers is None:
            if m.num_layers < stages:
                raise ValueError(f"model.num_layers={m.num_layers} is fewer than parallel.pp x "
                                 f"parallel.virtual_stages = {stages} stages; every stage needs a layer, so lower "
                                 "parallel.pp or parallel.virtual_stages")
        elif len(p.pipeline_layers) != stages or sum(p.pipeline_layers) != m.num_layers:
            raise ValueError(f"parallel.pipeline_layers={p.pipeline_layers} must give {stages} stages (parallel.pp x "
                             f"parallel.virtual_stages) whose layers sum to model.num_layers={m.num_layers}")
        if p.virtual_stages > 1 and self.train.grad_accum % p.pp:
            raise ValueError(f"train.grad_accum={self.train.grad_accum} micro-batches: the interleaved schedule "
                             f"(parallel.virtual_stages={p.virtual_stages}) sends them through in groups of "
                             f"parallel.pp={p.pp}; use a multiple of {p.pp}")

    def task_segment_len(self) -> int:
        """The segment of data.fact_task: model.memory's, or without memory the model's window, data.seq_len."""
        return self.model.memory.segment_len if self.model.memory is not None else self.data.seq_len

    def stage_layers(self) -> list[range]:
        """The global layer indices of each (virtual) pipeline stage, in order: [range(L)] without a pipeline."""
        p, layers = self.parallel, self.model.num_layers
        stages = p.pp * p.virtual_stages
        counts = p.pipeline_layers or [layers // stages + (i < layers % stages) for i in range(stages)]
        starts = [sum(counts[:i]) for i in range(stages)]
        return [range(start, start + count) for start, count in zip(starts, counts)]

    def pipeline_bubble(self) -> float:
        """The idle fraction of a step that the pipeline schedule costs: (p - 1) / (v x m + p - 1) for p stages,
        m micro-batches and v virtual stages per rank (Narayanan et al. 2021); 0 without a pipeline."""
        p, v, m = self.parallel.pp, self.parallel.virtual_stages, self.train.grad_accum
        return (p - 1) / (v * m + p - 1)

    def _fit_t5(self) -> None:
        """T5 trains by span corruption (its defaults unless the data section sets them) and has no
        absolute positions, so model.max_seq_len does not bound data.seq_len."""
        if self.data.span_corruption is None:
            self.data.span_corruption = SpanCorruptionConfig()
        try:  # the lengths depend on the config alone: refuse them before any rank starts
            self._span_corruption().check()
        except DataError as error:
            raise ValueError(str(error)) from None
        if self.parallel.sequence_parallel:
            raise ValueError("parallel.sequence_parallel is not supported for model.arch=t5; set it to false")

    def t5_lengths(self) -> tuple[int, int]:
        """(encoder, decoder) tokens per T5 sequence: data.seq_len, and span corruption's target length."""
        return self.data.seq_len, self._span_corruption().targets_length

    def _span_corruption(self) -> SpanCorruption:
        """The objective's lengths (the token ids come from the tokenizer when the loader builds it)."""
        noise = self.data.span_corruption
        return SpanCorruption(inputs_length=self.data.seq_len, noise_density=noise.noise_density,
                              mean_noise_span_length=noise.mean_noise_span_length,
                              sentinels=tuple(range(NUM_SENTINELS)), eod=0, pad=0, seed=0)

    def check_world_size(self, world_size: int) -> int:
        """The data-parallel size this config gets on `world_size` ranks."""
        p = self.parallel
        if world_size % (p.tp * p.pp):
            raise ConfigError(
                f"parallel: world size {world_size} is not divisible by tp x pp = {p.tp}x{p.pp}; "
                f"use a multiple of {p.tp * p.pp} ranks or change parallel.tp or parallel.pp"
            )
        dp = world_size // (p.tp * p.pp)
        if dp % p.ep:
            raise ConfigError(
                f"parallel.ep={p.ep} does not divide the data-parallel size {dp} ({world_size} ranks / tp {p.tp}"
                + (f" / pp {p.pp}" if p.pp > 1 else "") + "), "
                f"which the experts are sharded over; choose parallel.ep from {_divisors(dp)} or use more ranks"
            )
        return dp

    def check_vocab_size(self, *, tokenized: bool = True) -> int:
        """The vocabulary the model is built with: model.vocab_size, or the tokenizer's size when it is unset.

        When the tokenizer makes the model's input (`tokenized`: the run's loader or validation set), every
        id it has needs a row of the embedding, or the first step fails with an IndexError. The ranks check
        it, loading the tokenizer before they read data or build the model; load_config cannot: reading a config
        loads no tokenizer (`parallax plan` needs none). Batches of a caller's own need no tokenizer when
        model.vocab_size is set."""
        from data_pipeline import largest_token_ids, load_tokenizer
        from data_pipeline.tokenizer import tokenizer_path

        vocab_size = self.model.vocab_size
        if vocab_size is not None and not tokenized:
            return vocab_size
        tokens = load_tokenizer(self.data).get_vocab_size()
        if vocab_size is not None and vocab_size < tokens:
            raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the {tokens} tokens of tokenizer "
                              f"{tokenizer_path(self.data)}: ids from {vocab_size} up have no embedding row; raise "
                              f"model.vocab_size to {tokens} or more, or remove it to take the tokenizer's")
        vocab_size = vocab_size or tokens
        for corpus, largest in largest_token_ids(self.data):
            if largest >= vocab_size:
                raise ConfigError(f"{corpus}.bin: holds token id {largest}, beyond the model's {vocab_size}-token "
                                  f"vocabulary; set model.vocab_size to {largest + 1} or more, or tokenize the corpus "
                                  "with data.tokenizer")
        return vocab_size

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML (or the defaults when path is None), apply `a.b=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass the path of a YAML file such as configs/gpt-tiny.yaml")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:  # a binary file, or text saved in another encoding
            raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                              f"{e.start}); pass a YAML file saved as UTF-8, such as configs/gpt-tiny.yaml") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {path}{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must be a mapping of sections (model:, parallel:, ...)")
    for item in overrides:
        _apply_override(raw, item)
    model = raw.get("model")
    if isinstance(model, dict) and model.get("init_from") is not None:
        _take_model_from(Path(model["init_from"]).expanduser(), raw)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_explain(e.errors()[0], raw)) from None
    if cfg.model.init_from is not None:
        _check_tokenizer_fits(cfg)
    return cfg


def _take_model_from(directory: Path, raw: dict) -> None:
    """model.init_from: the model is the directory's, so `parallax plan`, the checks above and every rank
    see the real one. A field the run sets too must agree with config.json: a silent override would
    build a model the weights do not fit. Refuses a directory without the weights config.json describes
    (none, a quantized copy, another dtype or shape) before any rank starts."""
    from models.huggingface import HuggingFaceError, check_weights, read_config

    try:
        twin, hf_config = read_config(directory)
        theirs = twin.model_config(hf_config)
        check_weights(directory)
    except HuggingFaceError as error:
        raise ConfigError(f"model.init_from: {error}") from None
    except ValidationError as error:
        raise ConfigError(f"model.init_from: {directory / 'config.json'} gives a model Parallax cannot build: "
                          f"{error.errors()[0]['msg']}") from None
    ours = raw["model"]
    for name in sorted(theirs.model_fields_set & ours.keys()):
        if not _same_value(name, ours[name], getattr(theirs, name)):
            raise ConfigError(f"model.{name}={ours[name]} but {directory / 'config.json'} has {getattr(theirs, name)}; "
                              "remove it to take the directory's, or start from another directory")
    raw["model"] = {**theirs.model_dump(exclude_unset=True), **ours}
    data = raw.setdefault("data", {})
    if isinstance(data, dict) and data.get("tokenizer") is None:
        if not (directory / "tokenizer.json").is_file():
            raise ConfigError(f"model.init_from: {directory} has no tokenizer.json; set data.tokenizer to the "
                              "tokenizer the model was trained with")
        data["tokenizer"] = str(directory / "tokenizer.json")
        special = _special_tokens_of(directory)
        mask = special.pop("mask_token", None)
        for field, token in special.items():
            data.setdefault(field, token)
        # An encoder masks with its tokenizer's own mask token (BERT's [MASK]), unless the run names one.
        masked_lm = data.get("masked_lm")
        if theirs.arch == "bert" and mask is not None and (masked_lm is None or isinstance(masked_lm, dict)):
            data["masked_lm"] = {"mask_token": mask, **(masked_lm or {})}


def _special_tokens_of(directory: Path) -> dict[str, str]:
    """The data.eod_token and data.pad_token of the directory's tokenizer, as its tokenizer_config.json names
    them: a Hugging Face tokenizer ends documents with its eos (Llama's `</s>`), or without one with its sep
    (BERT's `[SEP]`, which separates its segments), and one with no pad token (Llama) pads with that too; and
    its mask_token, if it names one (masked language modelling's). {} without the file or an eos or sep
    token: the run's names then apply, and load_tokenizer names the field to set if the tokenizer lacks them."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        names = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"model.init_from: {path}: not valid JSON ({error})") from None
    if not isinstance(names, dict):
        raise ConfigError(f"model.init_from: {path}: not a JSON object of tokenizer settings")
    # transformers writes a special token as its text, or as an AddedToken {"content": ...} (older versions)
    content = lambda token: token.get("content") if isinstance(token, dict) else token  # noqa: E731
    eos = content(names.get("eos_token")) or content(names.get("sep_token"))
    pad, mask = content(names.get("pad_token")), content(names.get("mask_token"))
    found = {"eod_token": eos, "pad_token": pad or eos} if eos else {}
    return found | ({"mask_token": mask} if mask else {})


def _same_value(name: str, value: Any, theirs: Any) -> bool:
    """`value` as the schema reads it (YAML gives 1e-5 as a string) equals `theirs`."""
    try:
        return TypeAdapter(ModelConfig.model_fields[name].annotation).validate_python(value) == theirs
    except ValidationError:
        return False


def _check_tokenizer_fits(cfg: RunConfig) -> None:
    """Every id the run's tokenizer produces must have a row among the directory's vocab_size. A T5 must
    also start and end its decoder's sequences where span corruption does (from <pad>, ending with the
    end-of-document token), or the run would teach it other start and end tokens than it has learned."""
    from data_pipeline import EOD, PAD, load_tokenizer
    from data_pipeline.config import MaskedLMConfig
    from models.huggingface import read_config

    tokenizer = load_tokenizer(cfg.data)
    config_json = cfg.model.init_from / "config.json"
    tokens = tokenizer.get_vocab_size()
    if tokens > cfg.model.vocab_size:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} has {tokens} tokens but {config_json} has vocab_size "
                          f"{cfg.model.vocab_size}: the model has no row for its last ids; use the directory's "
                          "tokenizer (remove data.tokenizer)")
    if cfg.model.arch == "bert":
        mask = (cfg.data.masked_lm or MaskedLMConfig()).mask_token
        if tokenizer.token_to_id(mask) is None:
            raise ConfigError(f"model.init_from: data.tokenizer={cfg.data.tokenizer} has no mask token {mask} "
                              "(data.masked_lm.mask_token); remove data.masked_lm.mask_token to take the "
                              "directory's tokenizer's, or name a token it has")
    if cfg.model.arch != "t5":
        return
    hf_config = read_config(cfg.model.init_from)[1]
    for field, token in (("decoder_start_token_id", PAD), ("eos_token_id", EOD)):
        theirs, ours = getattr(hf_config, field, None), tokenizer.token_to_id(token)
        if theirs != ours:
            raise ConfigError(f"model.init_from: {config_json} has {field}={theirs} but data.tokenizer="
                              f"{cfg.data.tokenizer} has {token} at {ours}, where Parallax's T5 span corruption "
                              "puts it; use the tokenizer the model was trained with")


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    names = key.split(".")
    if not sep or not all(names):
        raise ConfigError(f"override '{item}' is not of the form section.field=value, e.g. parallel.tp=2")
    *parents, leaf = names
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': its value is not valid YAML ({getattr(e, 'problem', e)}); write a "
                          "YAML value, e.g. 8, 3e-4, true or [1, 2], quoting text that starts with a symbol") from None


def _explain(error: dict, raw: dict) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key '{loc}'{_did_you_mean(error['loc'])}"
    if error["type"] == "value_error":  # our own validators: prefix the field unless already named
        message = str(error["ctx"]["error"])
        return message if message.startswith(loc) else f"{loc}: {message}"
    got = error.get("input")
    shown = f"; got {got!r}" if got is not None and not isinstance(got, dict) else ""
    return f"{loc}: {error['msg'].lower()}{shown}"


def _did_you_mean(loc: tuple) -> str:
    """Suggest the closest known field of the section the unknown key sits in."""
    schema: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        annotation = schema.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        schema = annotation
    match = difflib.get_close_matches(str(loc[-1]), list(schema.model_fields), n=1)
    if not match:
        return f"; known keys here: {', '.join(schema.model_fields)}"
    return f" (did you mean '{'.'.join(map(str, loc[:-1] + (match[0],)))}'?)"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
