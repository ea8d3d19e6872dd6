"""`parallax plan CONFIG --nodes N --gpus-per-node G --gpu h100 [--search]`: print the plan.

Exit status 0 when the layout fits (with --search: when any layout fits), 1 when it does not, so a
script (and `parallax submit`, issue 7) can refuse a job before it queues; 2 for a bad config.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from launcher.arg_types import positive_int
from launcher.plan import pipeline
from launcher.plan.hardware import GPUS, GiB, USABLE_FRACTION, Cluster
from launcher.plan.startup import CPU_NS_PER_ELEMENT
from launcher.plan.throughput import DEFAULT_EFFICIENCY, DP_COLLECTIVES, ep_within_node, memory_token_overhead
from launcher.plan.window import window

if TYPE_CHECKING:  # the model, hence torch, is imported when a plan is made, not for `parallax --help`
    from launcher.plan.layout import Plan


def add_plan_command(commands) -> None:
    parser = commands.add_parser("plan", help="check on paper that a layout fits the GPUs, and estimate its speed")
    parser.add_argument("config", help="run config YAML, e.g. configs/gpt3-175b.yaml")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="dotted overrides, e.g. parallel.tp=8 parallel.zero_stage=2")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)} (default h100)")
    parser.add_argument("--efficiency", type=float, default=DEFAULT_EFFICIENCY,
                        help=f"fraction of peak FLOP/s the compute reaches (default {DEFAULT_EFFICIENCY})")
    parser.add_argument("--search", action="store_true", help="also rank every layout of the cluster that fits")
    parser.add_argument("--top", type=positive_int, default=10, help="layouts --search prints (default 10)")
    parser.set_defaults(run=_run)


def _run(args) -> None:
    from launcher.config import load_config
    from launcher.plan.layout import advice, plan, search

    cfg = load_config(args.config, args.overrides)
    cluster = Cluster.of(args.nodes, args.gpus_per_node, args.gpu)
    current = plan(cfg, cluster, efficiency=args.efficiency)
    print(f"parallax plan: {args.config} on {cluster.describe()}")
    print(render(current))
    if args.search:
        ranked = search(current, args.efficiency)
        print(render_search(ranked, args.top))
        sys.exit(0 if ranked else 1)
    if not current.fits:
        print(render_advice(advice(current, args.efficiency)))
    sys.exit(0 if current.fits else 1)


def render(p: Plan) -> str:
    cfg, m, s = p.cfg, p.memory, p.step
    precision, stage, dp = cfg.train.precision, cfg.parallel.zero_stage, p.dp
    gpu = p.cluster.gpu

    def split(partitioned: bool) -> str:
        return f"/ dp={dp}" if partitioned else "replicated over DP"

    w = window(cfg)
    sequence = f"{w.passes} segments x {w.span} positions" if cfg.model.memory else f"{w.tokens} tokens"
    activations = (f"micro-batch {cfg.train.micro_batch_size} x {sequence}, "
                   + ("checkpointed" if cfg.parallel.activation_checkpointing else "all kept")
                   + (", sequence-parallel" if cfg.parallel.sequence_parallel else ""))
    buffers = "DeepSpeed reduce bucket" + (" + 2 gathered layers" if stage == 3 else "") if stage else "none"
    master = "fp32 master + " if m.optimizer and (precision != "fp32" or stage) else ""
    verdict = "fits" if p.fits else "does NOT fit"
    tp_link = "NVLink" if cfg.parallel.tp <= p.cluster.gpus_per_node else "network"
    pp_link = "NVLink" if pipeline.p2p_within_node(p.cluster) else "network"
    dp_link = "NVLink" if cfg.parallel.tp * dp <= p.cluster.gpus_per_node else "network"
    ep = cfg.parallel.ep
    built = f"tp={cfg.parallel.tp}" + (f" ep={ep}" if cfg.model.moe else "")
    extra_work = " and ".join(
        [reason for reason, present in (("recomputation", cfg.parallel.activation_checkpointing),
                                        ("experts' capacity padding", cfg.model.moe)) if present])
    pp = cfg.parallel.pp
    lines = [
        f"model     {p.count} (rank 0 of {built}" + (f" x pp={pp}, each stage" if pp > 1 else "")
        + " built on the meta device)",
        f"layout    {p.layout()}; global batch {p.global_batch} x {w.tokens} tokens, {precision}",
        *(_pipeline_lines(p) if pp > 1 else []),
        *(_memory_lines(p) if cfg.model.memory else []),
        "memory per GPU                                                             GiB",
        _row(f"  parameters   {precision}, {split(stage >= 3)}", m.parameters),
        _row(f"  gradients    {precision}, {split(stage >= 2)}", m.gradients),
        _row(f"  optimizer    {master}Adam m, v, {split(stage >= 1)}", m.optimizer),
        *([_row(f"  of which experts: {p.count.experts_per_rank / 1e9:.2f}B on this GPU, states "
                + (f"/ expert-dp={dp // ep} from ZeRO-1" if stage else "replicated"), m.experts)]
          if p.count.experts_per_rank else []),
        _row(f"  buffers      {buffers}", m.buffers),
        _row(f"  activations  {activations}", m.activations),
        _row("  total", m.total) + f"  of {p.cluster.usable_bytes / GiB:.2f} usable "
        f"({USABLE_FRACTION:.0%} of {gpu.memory_gib:g}): {verdict}",
        f"step      estimate: compute at {s.efficiency:.0%} of peak, communication at line rate, no overlap",
        f"  model FLOPs {s.model_flops:.3g} per step"
        + (f" ({s.hardware_flops:.3g} done, with {extra_work})" if extra_work else ""),
        f"  compute                                                      {s.compute_seconds:9.3f} s",
        f"  TP all-reduces {s.tp_bytes / 1e9:10.2f} GB per GPU over {tp_link:8}                   {s.tp_seconds:9.3f} s",
        f"  DP {DP_COLLECTIVES[stage]}: {s.dp_bytes / 1e9:.2f} GB per GPU over {dp_link}",
        f"                                                               {s.dp_seconds:9.3f} s",
        *([f"  EP all-to-alls {s.ep_bytes / 1e9:10.2f} GB per GPU over "
           f"{'NVLink' if ep_within_node(cfg, p.cluster) else 'network':8}                   {s.ep_seconds:9.3f} s"]
          if cfg.model.moe else []),
        *([f"  PP sends       {s.p2p_bytes / 1e9:10.2f} GB per GPU over {pp_link:8}                   {s.p2p_seconds:9.3f} s",
           f"  pipeline bubble {s.bubble:.1%}: idle while the stages fill and drain".ljust(63)
           + f"{s.bubble_seconds:9.3f} s"]
          if pp > 1 else []),
        f"  step time {s.seconds:.3f} s, {s.tokens_per_second:,.0f} tokens/s, MFU {s.mfu:.1%} "
        f"of {gpu.peak_tflops[precision]:g} TFLOP/s {precision} peak per {gpu.name}",
        f"start-up  weights built on the GPU in {precision}: {p.startup.built_bytes / GiB:.2f} GiB per rank"
        + (" (its ZeRO-3 partition and one layer)" if cfg.parallel.zero_stage == 3 else "")
        + f"; host RAM per rank {p.startup.host_bytes / 2**20:.2f} MiB (the draw tile)",
        f"          initialisation ~{p.startup.init_seconds:.0f} s per rank at {CPU_NS_PER_ELEMENT:g} ns per element "
        "on one CPU core (bench/startup.py)",
        f"checkpoint each save copies {p.checkpoint_host_bytes / GiB:.2f} GiB per rank (fp32 masters, Adam m, v) into "
        f"host RAM kept between saves: {p.checkpoint_host_bytes * p.cluster.gpus_per_node / GiB:.2f} GiB per node",
    ]
    return "\n".join(lines)


def _pipeline_lines(p: Plan) -> list[str]:
    """The split, the schedule and its bubble: what the memory and step figures below assume."""
    cfg = p.cfg
    pp, v, m = cfg.parallel.pp, cfg.parallel.virtual_stages, cfg.train.grad_accum
    sizes = sorted({len(stage) for stage in cfg.stage_layers()})
    schedule = f"interleaved 1F1B, {v} virtual stages per rank" if v > 1 else "1F1B"
    return [
        f"pipeline  {pp} stages" + (f" x {v} virtual = {pp * v} chunks" if v > 1 else "")
        + f" of {' or '.join(map(str, sizes))} layers; {schedule}, {m} micro-batches per step; "
        f"bubble (p-1)/(v m+p-1) = {pp - 1}/{v * m + pp - 1} = {p.step.bubble:.1%}",
        f"          planned below: {p.rank.describe(pp)} (the most memory)",
    ]


def _memory_lines(p: Plan) -> list[str]:
    """The passes recurrent memory runs per window, what its memory tokens cost, and what backward keeps."""
    mem, w = p.cfg.model.memory, window(p.cfg)
    return [
        f"segments  {w.passes} x ({mem.segment_len} tokens + 2 x {mem.num_mem_tokens} memory) = {w.positions} "
        f"positions per sequence through every block, each over {w.span} keys",
        f"          memory tokens: +{memory_token_overhead(p.cfg, p.vocab_size):.1%} FLOPs "
        f"({p.step.model_flops / p.step.tokens:.3g} per token); all {w.passes} segments' activations kept for one "
        "backward",
        *([f"          (bptt_segments={mem.bptt_segments} cuts gradients, not what is kept)"]
          if mem.bptt_segments != -1 else []),
        *([f"          train.memory_curriculum: planned at its longest input; it starts at "
           f"{p.cfg.train.memory_curriculum.segments[0]}"] if p.cfg.train.memory_curriculum else []),
        *(["          data.fact_task: the output layer runs on the one answer token of each sample"]
          if p.cfg.data.fact_task else []),
    ]


def render_advice(fixes: list[tuple[str, Plan]]) -> str:
    if not fixes:
        return "no single change makes it fit; run with --search to try every layout of the cluster"
    lines = ["to fit, change one of:"]
    for overrides, fixed in fixes:
        lines.append(f"  {overrides:70} -> {fixed.memory.total / GiB:6.2f} GiB, {fixed.step.seconds:.3f} s/step")
    return "\n".join(lines)


def render_search(ranked: list[Plan], top: int) -> str:
    if not ranked:
        return "search: no layout of this cluster fits; add GPUs or nodes, or shorten data.seq_len"
    lines = [f"search: {len(ranked)} layouts fit, fastest first", "  s/step    MFU    GiB  layout"]
    for p in ranked[:top]:
        lines.append(f"  {p.step.seconds:6.3f} {p.step.mfu:6.1%} {p.memory.total / GiB:6.2f}  {p.layout()}")
    return "\n".join(lines)


def _row(label: str, value: float) -> str:
    return f"{label:72} {value / GiB:7.2f}"
