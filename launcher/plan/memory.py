"""Bytes per GPU at the peak of a training step: model states, DeepSpeed's buffers, activations.

Model states follow the ZeRO paper's accounting (Rajbhandari et al. 2020) as DeepSpeed implements
it, checked against a real engine on CPU (tests/test_plan.py): parameters and gradients in the
training precision, Adam's two fp32 moments, and an fp32 master copy of the weights whenever the
parameters are 16-bit or a ZeRO optimizer owns the update (DeepSpeed's ZeRO optimizer clones its
fp32 partition even when training in fp32). ZeRO partitions optimizer states over the data-parallel
ranks from stage 1, gradients from stage 2, parameters at stage 3. Experts are partitioned the
same way but over their expert-data-parallel group only (the DP / EP ranks holding the same
experts), which is how DeepSpeed's ZeRO 1/2 treat MoE parameter groups; MoE refuses ZeRO-3.

Activations are Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models"), which counts 16-bit activations and 1-byte dropout masks for a GPT block with a 4h MLP
and attention scores stored (no flash attention): a conservative figure. Their count goes tensor by
tensor, so it is kept here for a Llama-style block's own shapes: grouped-query attention keeps
narrower K and V, a SwiGLU MLP four [s, b, f] tensors where GeLU keeps two. In an MoE layer the MLP's
share is the experts' on their capacity buffer (top_k x capacity factor x tokens, split over TP
peers, which each send a share through the all-to-all), plus DeepSpeed's einsum dispatch: two
16-bit [tokens, experts, capacity] masks kept for backward, quadratic in the micro-batch's tokens.

With a pipeline, a GPU holds the model states of its pipeline rank's parameters (launcher/plan/count.py)
and the activations of its own layers for as many micro-batches as the schedule keeps in flight there
(launcher/plan/pipeline.py): on the first rank of 1F1B p micro-batches, L layers' worth.

With recurrent memory (launcher/plan/window.py) a block keeps the activations of every segment's pass, n
passes of L + 2M positions, each with its own (L + 2M)^2 attention scores, whatever bptt_segments says: the
linear terms grow by (L + 2M) / L, the scores are n (L + 2M)^2 where a plain window's are (n L)^2. The output
layer keeps those of the scored tokens, as without memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from launcher.plan.window import window

if TYPE_CHECKING:  # annotations only: imported at run time, they would make `parallax --help` import torch
    from launcher.config import RunConfig
    from launcher.plan.count import ParameterCount
    from launcher.plan.pipeline import PipelineRank

# DeepSpeed's default reduce_bucket_size (parallel/engine.py keeps it): from stage 1 the gradients
# are reduced through a contiguous bucket of this many elements, alive during backward.
REDUCE_BUCKET_ELEMENTS = 500_000_000
ZERO3_GATHERED_LAYERS = 2  # the block computing and the block prefetched

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Memory:
    parameters: float
    gradients: float
    optimizer: float
    buffers: float  # DeepSpeed's reduce bucket, and ZeRO-3's gathered layers
    activations: float
    experts: float = 0.0  # the experts' part of parameters + gradients + optimizer

    @property
    def model_states(self) -> float:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.buffers + self.activations


def optimizer_bytes_per_parameter(precision: str, zero_stage: int) -> int:
    """Adam's moments (8 bytes), plus the fp32 master weights (4) unless plain fp32 without ZeRO."""
    master = 4 if precision != "fp32" or zero_stage >= 1 else 0
    return 8 + master


def memory_per_gpu(cfg: RunConfig, count: ParameterCount, dp: int, vocab_size: int,
                   rank: PipelineRank | None = None) -> Memory:
    """Of the rank holding `count`; with a pipeline, of pipeline rank `rank`, whose parameters `count` is."""
    stage, precision = cfg.parallel.zero_stage, cfg.train.precision
    width = BYTES[precision]
    dense, experts = count.per_rank - count.experts_per_rank, count.experts_per_rank
    expert_dp = dp // cfg.parallel.ep

    def states(parameters: int, ranks: int, bytes_per_parameter: int, from_stage: int) -> float:
        return parameters * bytes_per_parameter / (ranks if stage >= from_stage else 1)

    per_state = {  # name -> (bytes per parameter, the ZeRO stage that partitions it)
        "parameters": (width, 3),
        "gradients": (width, 2),
        "optimizer": (optimizer_bytes_per_parameter(precision, stage), 1),
    }
    buffers = REDUCE_BUCKET_ELEMENTS * width if stage >= 1 else 0
    if stage == 3:
        buffers += ZERO3_GATHERED_LAYERS * count.per_layer_per_rank * width
    return Memory(
        **{name: states(dense, dp, *how) + states(experts, expert_dp, *how) for name, how in per_state.items()},
        buffers=buffers,
        activations=activation_bytes(cfg, vocab_size, rank),
        experts=sum(states(experts, expert_dp, *how) for how in per_state.values()),
    )


def activation_bytes(cfg: RunConfig, vocab_size: int, rank: PipelineRank | None = None) -> float:
    """Activations kept for backward (Korthikanti et al. 2022, section 4): of one micro-batch through the
    whole model, or with `rank`, what that pipeline rank keeps at its peak: rank.in_flight micro-batches'
    worth of its own layers (launcher/plan/pipeline.py says how many its schedule keeps)."""
    m, p = cfg.model, cfg.parallel
    if m.arch == "t5":
        return _t5_activation_bytes(cfg, vocab_size)
    w = window(cfg)  # with recurrent memory, each block's activations are those of every segment's pass
    s, b, h, a, L, t = w.span, cfg.train.micro_batch_size, m.hidden_size, m.num_heads, m.num_layers, p.tp
    v = m.padded_vocab_size(vocab_size)
    layers, first, last, in_flight = ((range(L), True, True, 1) if rank is None
                                      else (rank.layers, rank.first, rank.last, rank.in_flight))
    # Inside the TP region: Q and the projection's input (2sbh each), K and V (2sbh each, narrowed to
    # num_kv_heads heads), scores, softmax and its dropout mask (5as^2b), the MLP's inner tensors.
    # Outside it: both norms' inputs, both sub-layers' inputs and residual dropout masks (10sbh).
    # GPT-2's shapes give their 34sbh + 5as^2b.
    inside_tp = (s * b * h * (4 + 4 * m.kv_heads / a) + 5 * a * s * s * b
                 + _feed_forward_inner(m.swiglu) * s * b * m.ffn_size)
    if p.sequence_parallel:  # every tensor of the block is split over TP, norms and dropout included
        one_pass = (10 * s * b * h + inside_tp) / t
    else:
        one_pass = 10 * s * b * h + inside_tp / t
    moe_pass = one_pass + (_moe_mlp_minus_dense_mlp(cfg) if m.moe else 0)
    per_pass = [moe_pass if m.is_moe_layer(layer) else one_pass for layer in layers]  # each block's, per segment
    if p.activation_checkpointing:
        # Each block's 16-bit input is kept, every segment's; one block's pass at a time is rebuilt in full
        # during backward.
        inputs = 2 * w.positions * b * h / (t if p.sequence_parallel else 1)
        kept = in_flight * len(per_pass) * inputs + max(per_pass, default=0)
    else:
        kept = in_flight * w.passes * sum(per_pass)
    # Korthikanti's 4sbh/t (1 + v/h) beside the blocks, split between the ends of the model: the
    # embedding's output and dropout (2sbh/t, every position a block reads) on the first stage, for each
    # micro-batch in flight there; the final norm's and output layer's inputs (2sbh/t) and the fp32 logits for
    # the cross-entropy (4sbv/t), of the scored positions, on the last, whose loss backward frees each
    # micro-batch as soon as it is computed. With recurrent memory, the final norm's input at every segment's
    # write memory too (2 M b h a segment, whole on every TP rank).
    head = ((2 * w.positions * b * h / t * in_flight if first else 0)
            + (2 * w.scored * b * h / t + 4 * w.scored * b * v / t + 2 * w.memory_written * b * h if last else 0))
    if m.arch == "bert":
        head += _bert_head_extra(cfg)
    return (kept + head) * BYTES[cfg.train.precision] / 2


def _bert_head_extra(cfg: RunConfig) -> float:
    """What a BERT keeps beside the blocks more than a GPT's ends, in the same 16-bit units. GPT's count keeps
    the output layer's input (2sbh) on the last stage; a BERT's masked-LM head also keeps its transform's
    dense input, GeLU input and norm input (3 x 2sbh), and one more norm's input (2sbh): the embeddings'
    (post-LN) or the final norm's after the last block (pre-LN). These norms and the dense layer are
    replicated over TP, so their tensors are whole on every rank unless sequence parallelism splits them.
    The attention is bidirectional, which keeps nothing a causal mask would not: the same 5as^2b scores."""
    m, p = cfg.model, cfg.parallel
    s, b, h = cfg.data.seq_len, cfg.train.micro_batch_size, m.hidden_size
    return 4 * 2 * s * b * h / (p.tp if p.sequence_parallel else 1)


def _t5_activation_bytes(cfg: RunConfig, vocab_size: int) -> float:
    """Korthikanti's accounting, sub-layer by sub-layer, for T5's shapes, in the same 16-bit units.

    An attention sub-layer over s_q queries and s_kv keys keeps, replicated over TP, its norm input,
    the projections' input and the residual dropout mask (5 s_q b h), and split over TP the
    queries, keys, values and output projection input (2 s_q + 4 s_kv + 2 s_q) b x heads x kv_channels,
    plus scores, softmax and dropout mask (5 heads s_q s_kv b). A feed-forward keeps 5 s b h
    replicated and its inner activations split: 4 s b f (ReLU: wi output, ReLU output) or 8 s b f
    (gated: both inputs, GeLU output, product). For GPT's shapes this is exactly the formula above.
    The decoder's cross-attention reads the encoder output, kept once. MoE layers are counted as dense.
    """
    m, p = cfg.model, cfg.parallel
    (s_in, s_out), b, h, t = cfg.t5_lengths(), cfg.train.micro_batch_size, m.hidden_size, p.tp
    inner = m.num_heads * m.head_dim

    def attention(s_q: int, s_kv: int) -> float:
        return 5 * s_q * b * h + ((4 * s_q + 4 * s_kv) * b * inner + 5 * m.num_heads * s_q * s_kv * b) / t

    def feed_forward(s: int) -> float:
        return 5 * s * b * h + _feed_forward_inner(m.gated) * s * b * m.ffn_size / t

    encoder_layer = attention(s_in, s_in) + feed_forward(s_in)
    decoder_layer = attention(s_out, s_out) + attention(s_out, s_in) + feed_forward(s_out)
    if p.activation_checkpointing:  # each block's 16-bit input, and one block rebuilt at a time
        kept = 2 * b * h * (m.num_layers * s_in + m.decoder_layers * s_out) + max(encoder_layer, decoder_layer)
    else:
        kept = m.num_layers * encoder_layer + m.decoder_layers * decoder_layer
    # The encoder output, read by every cross-attention; final norms and embedding dropouts; fp32 logits.
    head = 2 * s_in * b * h + 4 * (s_in + s_out) * b * h / t + 4 * s_out * b * m.padded_vocab_size(vocab_size) / t
    return (kept + head) * BYTES[cfg.train.precision] / 2


def _feed_forward_inner(gated: bool) -> int:
    """A feed-forward's [s, b, f] activations kept for backward, in Korthikanti's 16-bit units of sbf:
    the up projection's output and the activation's (4), and for a gated one (SwiGLU, gated-GeLU)
    also the gate's output and the product fed to the down projection (8)."""
    return 8 if gated else 4


def _moe_mlp_minus_dense_mlp(cfg: RunConfig) -> float:
    """An MoE layer's MLP activations less the dense MLP's, in Korthikanti's 16-bit units.

    Dense: input 2sbh and dropout mask sbh (replicated unless sequence-parallel), its inner tensors
    (fc_in and GeLU outputs 4f/h sbh/t, 16sbh/t for a 4h MLP; SwiGLU twice that). MoE (the sequence
    is gathered before the router): input 2sbh, dropout mask sbh, the capacity buffer of
    c = top_k x capacity factor x sbh tokens-by-hidden: this TP rank's 1/t of it dispatched (2c/t),
    expanded by its experts, GeLU MLPs whatever model.mlp says (4f/h x c/t), gathered back (2c); and
    the two [sb, experts, capacity] masks, 2 x 2 x c x sb / h in sbh units."""
    m, p = cfg.model, cfg.parallel
    s, b, h, f, t = cfg.data.seq_len, cfg.train.micro_batch_size, m.hidden_size, m.ffn_size, p.tp
    sbh, tokens = s * b * h, s * b
    capacity = m.moe.top_k * m.moe.capacity_factor * sbh
    dense = sbh * (3 / (t if p.sequence_parallel else 1) + _feed_forward_inner(m.swiglu) * f / h / t)
    moe = 3 * sbh + capacity * (2 / t + _feed_forward_inner(False) * f / h / t + 2) + 4 * capacity * tokens / h
    return moe - dense
