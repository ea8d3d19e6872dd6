"""FLOPs, communication and time of one optimizer step.

Model FLOPs are Megatron's count (Narayanan et al. 2021, appendix): every matrix multiply at 2 FLOPs
per multiply-add, attention scores included, backward twice the forward; per sequence that is
72 L s h^2 (1 + s/(6h) + V/(12 L h)) for GPT-2's block (a 4h MLP, one K and V head per query head).
The count goes matrix by matrix, so a Llama-style block is the same sum over its own shapes: SwiGLU
has three h x f matrices where GeLU has two, grouped-query attention's K and V projections are
num_kv_heads heads wide, and the scores are unchanged (every query head still attends over the
sequence); an untied output layer costs what the tied one does, the embedding being a lookup. Full
activation recomputation runs each block's forward again (their 96 L s h^2 (1 + s/(6h) + V/(16 L h))):
the GPU does that work, but MFU counts only the model's FLOPs. A token meets top_k experts of an MoE
layer (model FLOPs), but the experts compute their whole capacity buffer, top_k x capacity factor
per token, padding included (done).

Time is compute at an assumed fraction of the GPU's peak plus communication at line rate, with no
overlap: TP's collectives sit on the critical path by construction, and parallel/engine.py leaves
DeepSpeed's overlap_comm at its default (off for stages 1-2). It is an estimate to rank layouts and
catch hopeless ones, not a promise.

With a pipeline (launcher/plan/pipeline.py) each rank computes its own blocks, the last also the output
layer, and sends activations and gradients to its neighbouring stages; the slowest rank paces the
others, and the schedule's bubble idles every rank for (p-1)/(v m+p-1) of the step: a step is the
micro-batch work / (1 - bubble), so the bubble lowers the MFU it reports.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from launcher.plan import pipeline
from launcher.plan.memory import BYTES
from launcher.plan.window import Window, window

if TYPE_CHECKING:  # annotations only: imported at run time, they would make `parallax --help` import torch
    from launcher.config import RunConfig
    from launcher.plan.count import ParameterCount
    from launcher.plan.hardware import Cluster
    from launcher.plan.pipeline import PipelineRank

DEFAULT_EFFICIENCY = 0.5  # Megatron-LM reports 44-52% of A100 peak for GPT-3-scale runs


@dataclass(frozen=True)
class Step:
    model_flops: float
    hardware_flops: float
    compute_seconds: float
    tp_bytes: float  # sent by one GPU per step
    tp_seconds: float
    dp_bytes: float
    dp_seconds: float
    ep_bytes: float  # the MoE layers' all-to-alls
    ep_seconds: float
    peak_flops: float  # of the whole cluster
    efficiency: float  # the assumed fraction of peak the compute reaches
    tokens: int
    p2p_bytes: float = 0.0  # sent by one GPU to its neighbouring pipeline stages
    p2p_seconds: float = 0.0
    bubble: float = 0.0  # the pipeline's idle fraction of the step
    bubble_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return (self.compute_seconds + self.tp_seconds + self.dp_seconds + self.ep_seconds + self.p2p_seconds
                + self.bubble_seconds)

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.seconds * self.peak_flops)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def forward_flops_per_sequence(cfg: RunConfig, vocab_size: int, *, padded: bool = False) -> tuple[float, float]:
    """(all blocks, output layer) forward FLOPs for one sequence. An MoE layer's MLP is its router
    plus top_k experts per token, or with `padded`, top_k x capacity factor: what the GPUs compute.
    With recurrent memory the blocks run every segment with its memory tokens (launcher/plan/window.py),
    the output layer only the scored tokens. A BERT's blocks cost a GPT's (its bidirectional scores are the
    full s x s that Megatron counts for causal ones too); its output layer is the masked-LM head, run at every
    position although only the masked ones are scored: the transform's dense h x h, then the vocabulary."""
    m = cfg.model
    if m.arch == "t5":
        return _t5_forward_flops(cfg, vocab_size, padded)
    blocks = sum(layer_forward_flops(cfg, range(m.num_layers), padded))
    output = 2 * window(cfg).scored * m.hidden_size * m.padded_vocab_size(vocab_size)
    if m.arch == "bert":  # the masked-LM head's transform (dense h x h) before the output layer, at every position
        output += 2 * window(cfg).scored * m.hidden_size * m.hidden_size
    return blocks, output


def layer_forward_flops(cfg: RunConfig, layers: Sequence[int], padded: bool = False) -> list[float]:
    """Forward FLOPs for one sequence of each GPT block in `layers`, by forward_flops_per_sequence's rule."""
    return _layer_flops(cfg, window(cfg), layers, padded)


def memory_token_overhead(cfg: RunConfig, vocab_size: int) -> float:
    """The memory tokens' extra model FLOPs, as a fraction of what the same segments cost without them: each
    block runs L + 2M positions per segment instead of L, over L + 2M keys; the output layer is unchanged."""
    blocks, output = forward_flops_per_sequence(cfg, vocab_size)
    bare = sum(_layer_flops(cfg, window(cfg, memory_tokens=False), range(cfg.model.num_layers)))
    return (blocks - bare) / (bare + output)


def _layer_flops(cfg: RunConfig, w: Window, layers: Sequence[int], padded: bool = False) -> list[float]:
    """Each block's FLOPs for `w`'s passes of `w.span` positions, every query over every key of its pass
    (causal and memory masks counted in full, as Megatron counts causal attention)."""
    m, s = cfg.model, w.span
    h, f = m.hidden_size, m.ffn_size
    qkv_rows = (m.num_heads + 2 * m.kv_heads) * m.head_dim
    attention = 2 * s * (qkv_rows + h) * h + 4 * s * s * h  # QKV, proj; QK^T and attention x V
    mlp = 2 * s * (3 if m.swiglu else 2) * h * f  # fc_in (fc_gate), fc_out
    moe_mlp = 0.0
    if m.moe:
        expert = 2 * s * 2 * h * f  # models.moe.Expert is a GeLU MLP whatever model.mlp says
        experts_per_token = m.moe.top_k * (m.moe.capacity_factor if padded else 1)
        moe_mlp = experts_per_token * expert + 2 * s * h * m.moe.num_experts  # and the router
    return [w.passes * (attention + (moe_mlp if m.is_moe_layer(layer) else mlp)) for layer in layers]


def _t5_forward_flops(cfg: RunConfig, vocab_size: int, padded: bool) -> tuple[float, float]:
    """The same count for T5: q, kv and o projections of width heads x kv_channels; scores over the
    encoder (bidirectional), the decoder (causal, counted in full as Megatron does) and, in the
    decoder, over the encoder output; a 2- or 3-matrix feed-forward (or an MoE layer's experts)."""
    m = cfg.model
    s_in, s_out = cfg.t5_lengths()
    h, f, inner = m.hidden_size, m.ffn_size, m.num_heads * m.head_dim

    def attention(s_q: int, s_kv: int) -> float:
        return 2 * s_q * 2 * h * inner + 2 * s_kv * 2 * h * inner + 4 * s_q * s_kv * inner

    def feed_forward(s: int, layer: int) -> float:
        if not m.is_moe_layer(layer):
            return 2 * s * (3 if m.gated else 2) * h * f
        experts_per_token = m.moe.top_k * (m.moe.capacity_factor if padded else 1)
        return experts_per_token * 2 * s * 2 * h * f + 2 * s * h * m.moe.num_experts

    encoder = sum(attention(s_in, s_in) + feed_forward(s_in, i) for i in range(m.num_layers))
    decoder = sum(attention(s_out, s_out) + attention(s_out, s_in) + feed_forward(s_out, i)
                  for i in range(m.decoder_layers))
    return encoder + decoder, 2 * s_out * h * m.padded_vocab_size(vocab_size)


def tp_bytes_per_step(cfg: RunConfig, rank: PipelineRank | None = None) -> float:
    """Each block all-reduces its [s, b, h] output twice forward and twice backward (the Megatron f/g
    pair per sub-layer), twice more when recomputed; the embedding and the logits' input add one each.
    Sequence parallelism swaps each all-reduce for a reduce-scatter plus an all-gather: same volume.
    An MoE layer's MLP has no all-reduce: DeepSpeed all-gathers the TP peers' shares of the capacity
    buffer (top_k x capacity factor x the message) once forward (again when recomputed), once backward.
    With a pipeline, a rank does this for its own blocks, the embedding's on the first, the logits' on
    the last. With recurrent memory a block's messages are its segments' L + 2M positions each; the
    embedding's carry the tokens, the logits' input the scored positions."""
    t, p = cfg.parallel.tp, cfg.parallel
    if t == 1:
        return 0.0
    per_sublayer = 3 if p.activation_checkpointing else 2
    if cfg.model.arch == "t5":  # 2 sub-layers per encoder layer on s_in tokens, 3 per decoder layer on s_out
        s_in, s_out = cfg.t5_lengths()
        m = cfg.model
        messages = (2 * m.num_layers * per_sublayer + 1) * s_in + (3 * m.decoder_layers * per_sublayer + 2) * s_out
        return cfg.train.grad_accum * messages * 2 * (t - 1) / t * _message_bytes(cfg) / cfg.data.seq_len
    layers, ends = _held(cfg, rank)
    moe_layers = _moe_layers(cfg, layers)
    block_all_reduces = (2 * len(layers) - moe_layers) * per_sublayer
    all_gathers = moe_layers * per_sublayer * _capacity_per_token(cfg)  # in messages
    blocks = (block_all_reduces * 2 + all_gathers) * _message_bytes(cfg, window(cfg).positions)
    return cfg.train.grad_accum * (t - 1) / t * (blocks + 2 * _message_bytes(cfg, ends))


def ep_bytes_per_step(cfg: RunConfig, rank: PipelineRank | None = None) -> float:
    """Each MoE layer sends its capacity buffer (tokens x hidden x top_k x capacity factor, this TP
    rank's 1/t share of it) through two all-to-alls forward (to the experts and back) and two
    backward, two more when recomputed; (ep-1)/ep of each leaves the GPU. With a pipeline, a rank's
    own MoE layers."""
    ep = cfg.parallel.ep
    if ep == 1:
        return 0.0
    all_to_alls = _moe_layers(cfg, _held(cfg, rank)[0]) * (6 if cfg.parallel.activation_checkpointing else 4)
    buffer = _capacity_per_token(cfg) * _message_bytes(cfg) / cfg.parallel.tp
    return cfg.train.grad_accum * all_to_alls * (ep - 1) / ep * buffer


def _moe_layers(cfg: RunConfig, layers: Sequence[int] | None = None) -> int:
    layers = range(cfg.model.num_layers) if layers is None else layers
    return sum(cfg.model.is_moe_layer(layer) for layer in layers)


def _held(cfg: RunConfig, rank: PipelineRank | None) -> tuple[Sequence[int], int]:
    """The blocks a rank runs, and the positions its ends of the model carry: the embedding's tokens, the
    output layer's scored positions."""
    w = window(cfg)
    if rank is None:
        return range(cfg.model.num_layers), w.tokens + w.scored
    return rank.layers, w.tokens * rank.first + w.scored * rank.last


def _capacity_per_token(cfg: RunConfig) -> float:
    return cfg.model.moe.top_k * cfg.model.moe.capacity_factor if cfg.model.moe else 0.0


def _message_bytes(cfg: RunConfig, positions: int | None = None) -> float:
    """One micro-batch's [s, b, h] activations, or [positions, b, h]."""
    s = cfg.data.seq_len if positions is None else positions
    return s * cfg.train.micro_batch_size * cfg.model.hidden_size * BYTES[cfg.train.precision]


DP_COLLECTIVES = {
    0: "gradient all-reduce",
    1: "gradient reduce-scatter + parameter all-gather",
    2: "gradient reduce-scatter per micro-batch + parameter all-gather",
    3: "parameter all-gathers (forward, backward) + gradient reduce-scatter per micro-batch",
}


def dp_bytes_per_step(cfg: RunConfig, count: ParameterCount, dp: int) -> float:
    """The ZeRO paper's volumes: stages 0-2 move 2 x parameters per step (all-reduce, or
    reduce-scatter + all-gather), stage 3 1.5x that. Stages 2-3 cannot keep whole gradients, so they
    reduce every micro-batch; stage 3 also gathers the parameters for each forward and backward.
    Experts move over their expert-data-parallel group of dp / ep ranks."""
    expert_dp = dp // cfg.parallel.ep
    dense = count.per_rank - count.experts_per_rank
    ring = ((dp - 1) / dp * dense + (expert_dp - 1) / expert_dp * count.experts_per_rank) * BYTES[cfg.train.precision]
    accum, stage = cfg.train.grad_accum, cfg.parallel.zero_stage
    if stage <= 1:
        return 2 * ring
    if stage == 2:
        return accum * ring + ring
    return 3 * accum * ring


def step_estimate(cfg: RunConfig, cluster: Cluster, count: ParameterCount, dp: int, vocab_size: int,
                  efficiency: float = DEFAULT_EFFICIENCY, rank: PipelineRank | None = None) -> Step:
    """The step as the rank holding `count` sees it; with a pipeline, pipeline rank `rank`, whose
    parameters `count` is. Its compute is its own blocks' (and on the last rank the output layer's)
    FLOPs over its TP group; its micro-batch work (compute, TP, EP) is stretched by the pipeline's bubble
    to busy / (1 - bubble); then its stage's gradients cross DP."""
    sequences = cfg.train.micro_batch_size * cfg.train.grad_accum * dp
    blocks, output = forward_flops_per_sequence(cfg, vocab_size)
    computed, _ = forward_flops_per_sequence(cfg, vocab_size, padded=True)
    model_flops = 3 * sequences * (blocks + output)
    passes = 4 if cfg.parallel.activation_checkpointing else 3
    hardware_flops = sequences * (passes * computed + 3 * output)
    peak = cluster.peak_flops(cfg.train.precision) * cluster.world_size
    tp_bytes, dp_bytes = tp_bytes_per_step(cfg, rank), dp_bytes_per_step(cfg, count, dp)
    ep_bytes = ep_bytes_per_step(cfg, rank)
    p2p_bytes = pipeline.p2p_bytes_per_step(cfg, _message_bytes(cfg))
    gpu = cluster.gpu
    # TP peers are adjacent ranks, on one node while tp <= gpus_per_node; an EP group is ep
    # consecutive DP ranks strided by tp, on one node while tp x ep <= gpus_per_node; a stage's DP
    # group is its tp x dp ranks strided by tp, on one node while they fit one.
    tp_gbs = gpu.intra_node_gbs if cfg.parallel.tp <= cluster.gpus_per_node else gpu.inter_node_gbs
    ep_gbs = gpu.intra_node_gbs if ep_within_node(cfg, cluster) else gpu.inter_node_gbs
    dp_gbs = gpu.intra_node_gbs if cfg.parallel.tp * dp <= cluster.gpus_per_node else gpu.inter_node_gbs
    p2p_gbs = gpu.intra_node_gbs if pipeline.p2p_within_node(cluster) else gpu.inter_node_gbs
    compute_seconds = _gpu_flops(cfg, vocab_size, rank, passes) / (peak / cluster.world_size * efficiency)
    tp_seconds, ep_seconds = tp_bytes / (tp_gbs * 1e9), ep_bytes / (ep_gbs * 1e9)
    return Step(
        model_flops=model_flops,
        hardware_flops=hardware_flops,
        compute_seconds=compute_seconds,
        tp_bytes=tp_bytes,
        tp_seconds=tp_seconds,
        dp_bytes=dp_bytes,
        dp_seconds=dp_bytes / (dp_gbs * 1e9),
        ep_bytes=ep_bytes,
        ep_seconds=ep_seconds,
        peak_flops=peak,
        efficiency=efficiency,
        tokens=sequences * window(cfg).tokens,
        p2p_bytes=p2p_bytes,
        p2p_seconds=p2p_bytes / (p2p_gbs * 1e9),
        bubble=pipeline.bubble(cfg),
        bubble_seconds=pipeline.bubble_seconds(cfg, compute_seconds + tp_seconds + ep_seconds),
    )


def _gpu_flops(cfg: RunConfig, vocab_size: int, rank: PipelineRank | None, passes: int) -> float:
    """FLOPs one GPU computes per step: a DP replica's micro-batches through the blocks (and output layer)
    it holds, shared by its TP group. Without a pipeline, the whole step's hardware FLOPs / (tp x dp)."""
    sequences = cfg.train.micro_batch_size * cfg.train.grad_accum
    if rank is None or cfg.model.arch == "t5":
        blocks, output = forward_flops_per_sequence(cfg, vocab_size, padded=True)[0], True
    else:
        blocks, output = sum(layer_forward_flops(cfg, rank.layers, padded=True)), rank.last
    output_flops = forward_flops_per_sequence(cfg, vocab_size)[1] if output else 0
    return sequences * (passes * blocks + 3 * output_flops) / cfg.parallel.tp


def ep_within_node(cfg: RunConfig, cluster: Cluster) -> bool:
    return cfg.parallel.tp * cfg.parallel.ep <= cluster.gpus_per_node
