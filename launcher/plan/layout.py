"""A layout's plan: a config's parallel layout on a cluster, what it costs in memory and in time,
whether it fits, what single change would make it fit, and the search over all layouts.

A layout is nothing but a run config (parallel.*, train.micro_batch_size/grad_accum) on a cluster,
so every candidate is validated by the one schema in launcher/config.py and described by the same
dotted overrides a user passes to `parallax train`.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Iterator

from pydantic import ValidationError

from launcher.config import ConfigError, RunConfig
from launcher.plan.checkpoint import checkpoint_host_bytes
from launcher.plan.count import ParameterCount, checked_count, closed_form_count
from launcher.plan.hardware import Cluster
from launcher.plan.memory import Memory, memory_per_gpu
from launcher.plan.pipeline import PipelineRank, pipeline_ranks
from launcher.plan.startup import Startup, startup_per_rank
from launcher.plan.throughput import DEFAULT_EFFICIENCY, Step, step_estimate


@dataclass(frozen=True)
class Plan:
    cfg: RunConfig
    cluster: Cluster
    dp: int
    vocab_size: int
    count: ParameterCount  # what a GPU of `rank` holds
    memory: Memory  # of a GPU of `rank`
    step: Step  # of the slowest pipeline rank
    startup: Startup  # of a GPU of `rank`
    checkpoint_host_bytes: float  # per rank of `rank`, kept between saves
    rank: PipelineRank  # the pipeline rank planned: the one needing the most memory (the only one without PP)
    model_count: ParameterCount  # rank 0 of this TP x EP layout without a pipeline, the meta build's

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.cluster.usable_bytes

    @property
    def global_batch(self) -> int:
        return self.cfg.train.micro_batch_size * self.cfg.train.grad_accum * self.dp

    def layout(self) -> str:
        p, t = self.cfg.parallel, self.cfg.train
        pp = f"pp={p.pp} " + (f"vstages={p.virtual_stages} " if p.virtual_stages > 1 else "") if p.pp > 1 else ""
        ep = f"ep={p.ep} " if self.cfg.model.moe else ""
        return (f"tp={p.tp} {pp}{ep}dp={self.dp} zero={p.zero_stage} sp={'on' if p.sequence_parallel else 'off'} "
                f"checkpointing={'on' if p.activation_checkpointing else 'off'} "
                f"micro-batch={t.micro_batch_size} grad-accum={t.grad_accum}")


def vocab_size_of(cfg: RunConfig) -> int:
    """The vocabulary the run will train, by the same rule as launcher/train.py."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    from data_pipeline import load_tokenizer

    return load_tokenizer(cfg.data).get_vocab_size()


def plan(cfg: RunConfig, cluster: Cluster, *, count: ParameterCount | None = None, vocab_size: int | None = None,
         efficiency: float = DEFAULT_EFFICIENCY) -> Plan:
    """Plan `cfg` on `cluster`. `count` is rank 0 of the TP x EP layout without a pipeline; without it,
    rank 0 is built on the meta device and counted, and checked against the closed form.

    With a pipeline, each pipeline rank is planned on its own: its stage as training builds it, on the
    meta device and checked against the closed form, or given `count` (the search), the closed form
    alone. The plan shows the rank that needs the most memory, which decides whether the layout fits,
    and the step of the slowest rank, which the others wait for."""
    if not 0 < efficiency <= 1:
        raise ConfigError(f"--efficiency={efficiency} must be a fraction of peak in (0, 1], e.g. 0.5")
    dp = cfg.check_world_size(cluster.world_size)
    cluster.peak_flops(cfg.train.precision)  # refuse a precision the GPU lacks before building anything
    vocab_size = vocab_size or vocab_size_of(cfg)
    p = cfg.parallel
    model_count = count or checked_count(cfg.model, vocab_size, p.tp, p.ep)
    ranks = pipeline_ranks(cfg)
    if p.pp == 1:  # the unpipelined arithmetic, on the meta build's count
        planned = [(None, model_count)]
    else:
        stage_count = closed_form_count if count else checked_count
        planned = [(rank, stage_count(cfg.model, vocab_size, p.tp, p.ep, rank)) for rank in ranks]
    memories = [memory_per_gpu(cfg, c, dp, vocab_size, rank) for rank, c in planned]
    steps = [step_estimate(cfg, cluster, c, dp, vocab_size, efficiency, rank) for rank, c in planned]
    fullest = max(range(len(planned)), key=lambda i: memories[i].total)
    return Plan(
        cfg=cfg, cluster=cluster, dp=dp, vocab_size=vocab_size, count=planned[fullest][1],
        memory=memories[fullest],
        step=max(steps, key=lambda step: step.seconds),
        startup=startup_per_rank(cfg, planned[fullest][1], dp),
        checkpoint_host_bytes=checkpoint_host_bytes(cfg, planned[fullest][1], dp),
        rank=ranks[fullest], model_count=model_count,
    )


def changed(cfg: RunConfig, overrides: dict[str, object]) -> RunConfig | None:
    """`cfg` with dotted overrides applied and re-validated, or None if the schema refuses them."""
    raw = cfg.model_dump(mode="json")
    for key, value in overrides.items():
        section, field = key.split(".")
        raw[section][field] = value
    try:
        return RunConfig.model_validate(raw)
    except ValidationError:
        return None


def advice(current: Plan, efficiency: float = DEFAULT_EFFICIENCY) -> list[tuple[str, Plan]]:
    """For each knob (TP, PP, EP, ZeRO stage, activation checkpointing, sequence parallelism, micro-batch),
    the smallest single change of it that makes the layout fit, keeping the global batch."""
    p, t = current.cfg.parallel, current.cfg.train
    knobs = [
        [_layout_change(current, tp=tp, pp=p.pp, micro_batch=t.micro_batch_size)
         for tp in _tp_sizes(current.cluster) if tp > p.tp],
        [_layout_change(current, tp=p.tp, pp=pp, micro_batch=t.micro_batch_size)
         for pp in _pp_sizes(current.cfg, current.cluster.world_size // p.tp) if pp > p.pp],
        [{"parallel.ep": ep} for ep in _ep_sizes(current.cfg, current.dp) if ep > p.ep],
        [{"parallel.zero_stage": stage} for stage in range(p.zero_stage + 1, 4)],
        [] if p.activation_checkpointing else [{"parallel.activation_checkpointing": True}],
        [] if p.tp == 1 or p.sequence_parallel else [{"parallel.sequence_parallel": True}],
        [_layout_change(current, tp=p.tp, pp=p.pp, micro_batch=mb)
         for mb in reversed(_powers_of_two(t.micro_batch_size - 1))],
    ]
    fixes = []
    for options in knobs:
        for overrides in filter(None, options):
            cfg = changed(current.cfg, overrides)
            candidate = cfg and _replan(cfg, current, efficiency)
            if candidate is not None and candidate.fits:
                fixes.append((_describe(overrides, current.cfg), candidate))
                break
    return fixes


def search(current: Plan, efficiency: float = DEFAULT_EFFICIENCY) -> list[Plan]:
    """Every valid TP x PP (x virtual stages) x EP x DP x ZeRO x micro-batch x checkpointing (x sequence
    parallelism) layout of the cluster at the current global batch that fits, fastest first. TP stays
    inside a node; the schema refuses what a pipeline cannot do (ZeRO-2/3, T5, fp16)."""
    fitting = [plan_ for plan_ in _layouts(current, efficiency) if plan_.fits]
    return sorted(fitting, key=lambda plan_: (plan_.step.seconds, plan_.memory.total))


def _layouts(current: Plan, efficiency: float) -> Iterator[Plan]:
    world = current.cluster.world_size
    for tp in _tp_sizes(current.cluster):
        for pp in _pp_sizes(current.cfg, world // tp):
            for virtual_stages, micro_batch in product(_virtual_stage_counts(current.cfg, pp),
                                                       _powers_of_two(current.global_batch)):
                base = _layout_change(current, tp=tp, pp=pp, micro_batch=micro_batch, virtual_stages=virtual_stages)
                if base is None:
                    continue
                for ep, zero_stage, checkpointing, sequence_parallel in product(
                    _ep_sizes(current.cfg, world // (tp * pp)),
                    (0, 1, 2) if current.cfg.model.moe else (0, 1, 2, 3),  # DeepSpeed's MoE refuses ZeRO-3
                    (False, True),
                    (False, True) if tp > 1 else (False,),
                ):
                    if pp > 1 and zero_stage > 1:  # the schema would refuse it; skip the validation
                        continue
                    cfg = changed(current.cfg, {
                        **base, "parallel.ep": ep, "parallel.zero_stage": zero_stage,
                        "parallel.activation_checkpointing": checkpointing,
                        "parallel.sequence_parallel": sequence_parallel,
                    })
                    candidate = cfg and _replan(cfg, current, efficiency)
                    if candidate is not None:
                        yield candidate


def _layout_change(current: Plan, tp: int, pp: int, micro_batch: int,
                   virtual_stages: int | None = None) -> dict[str, object] | None:
    """TP, PP and micro-batch overrides with the gradient accumulation that keeps the global batch. A
    pipeline split by the config's parallel.pipeline_layers is split evenly instead when PP changes."""
    world, p = current.cluster.world_size, current.cfg.parallel
    dp = world // (tp * pp) if world % (tp * pp) == 0 else 0
    if not dp or current.global_batch % (micro_batch * dp):
        return None
    accum = current.global_batch // (micro_batch * dp)
    change = {"parallel.tp": tp, "parallel.pp": pp, "train.micro_batch_size": micro_batch, "train.grad_accum": accum}
    if virtual_stages is None:  # keep the config's interleaving while there is a pipeline to interleave
        virtual_stages = p.virtual_stages if pp > 1 else 1
    if (pp, virtual_stages) != (p.pp, p.virtual_stages):
        change |= {"parallel.virtual_stages": virtual_stages, "parallel.pipeline_layers": None}
    return change


def _replan(cfg: RunConfig, current: Plan, efficiency: float) -> Plan | None:
    if (cfg.parallel.tp, cfg.parallel.ep) == (current.cfg.parallel.tp, current.cfg.parallel.ep):
        count = current.model_count
    else:
        count = closed_form_count(cfg.model, current.vocab_size, cfg.parallel.tp, cfg.parallel.ep)
    try:
        return plan(cfg, current.cluster, count=count, vocab_size=current.vocab_size, efficiency=efficiency)
    except ConfigError:
        return None


def _tp_sizes(cluster: Cluster) -> list[int]:
    """TP stays inside a node: its all-reduces on every layer would crawl over the network."""
    return [tp for tp in range(1, cluster.gpus_per_node + 1) if cluster.world_size % tp == 0]


def _pp_sizes(cfg: RunConfig, ranks: int) -> list[int]:
    """Pipeline sizes that divide the `ranks` left beside TP and give every stage a layer; 1 for a model
    no pipeline can split (T5, BERT) or a precision it cannot train (fp16): the schema would refuse the rest."""
    if cfg.model.arch != "gpt" or cfg.train.precision == "fp16":
        return [1]
    return [pp for pp in range(1, min(ranks, cfg.model.num_layers) + 1) if ranks % pp == 0]


def _virtual_stage_counts(cfg: RunConfig, pp: int) -> list[int]:
    """1, and with a pipeline the interleavings that split the layers evenly into pp x v chunks: an uneven
    split leaves its largest chunk on the critical path, which the plan's even-chunk arithmetic would miss."""
    layers = cfg.model.num_layers
    if pp == 1:
        return [1]
    return [1] + [v for v in range(2, layers // pp + 1) if layers % (pp * v) == 0]


def _ep_sizes(cfg: RunConfig, dp: int) -> list[int]:
    """EP is carved out of the data-parallel ranks and shards the experts: it divides both."""
    if cfg.model.moe is None:
        return [1]
    return [ep for ep in range(1, dp + 1) if dp % ep == 0 and cfg.model.moe.num_experts % ep == 0]


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(limit.bit_length()) if 2**i <= limit]


def _describe(overrides: dict[str, object], cfg: RunConfig) -> str:
    """The overrides that change something, as the user would type them."""
    def current(key: str) -> object:
        section, field = key.split(".")
        return getattr(getattr(cfg, section), field)

    def typed(value: object) -> str:
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    return " ".join(f"{key}={typed(value)}"
                    for key, value in overrides.items() if current(key) != value)
