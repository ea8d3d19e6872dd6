"""How many parameters one rank holds: the model built on the meta device, and the closed form.

The meta build is the real model (`models.gpt.GPT`, `models.t5.T5` or `models.bert.BERT`) for rank 0 of the layout's tensor-parallel group, so it
counts exactly what a training rank allocates, without allocating it. Megatron's layers ask
`parallel_state` for the TP group, so the build runs inside a world of fake ranks (torch's "fake"
backend: groups of any size in one process, no communication). Only the model-parallel ranks are
faked: a data-parallel replica holds the same shard, and creating every group of a thousands-GPU
world costs seconds and tells nothing more. Megatron's `use_cpu_initialization` draws each full
weight and copies this rank's slice; under `torch.device("meta")` both are shape-only.

The closed form is the same architecture written down by hand; the plan refuses to go on if the two
disagree, and the search (which plans many TP sizes) uses it for the sizes it does not build.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.config import ModelConfig

if TYPE_CHECKING:
    from launcher.plan.pipeline import PipelineRank


@dataclass(frozen=True)
class ParameterCount:
    per_rank: int  # what one GPU holds before ZeRO partitions it, its experts included
    total: int  # the model, every TP shard and every expert counted once
    per_layer_per_rank: int  # the largest block's share: what ZeRO-3 gathers at a time
    experts_per_rank: int = 0  # the part of per_rank that is experts: ZeRO partitions it over DP / EP ranks
    active: int | None = None  # parameters one token meets (top_k of each MoE layer's experts); None: total

    @property
    def active_per_token(self) -> int:
        return self.total if self.active is None else self.active

    def __str__(self) -> str:
        moe = f" ({self.active_per_token / 1e9:.2f}B active per token)" if self.experts_per_rank else ""
        return f"{self.total / 1e9:.2f}B parameters{moe}, {self.per_rank / 1e9:.2f}B per GPU"


def closed_form_count(m: ModelConfig, vocab_size: int, tp: int, ep: int = 1,
                      rank: PipelineRank | None = None) -> ParameterCount:
    """What one rank of a TP=`tp`, EP=`ep` layout holds: of the whole model, or with `rank`, of that
    pipeline rank's layers and the ends of the model it holds (pipelines are GPT-only)."""
    if m.arch == "t5":
        if rank is not None:
            raise ValueError("a T5 has no pipeline stages; count it without a pipeline rank")
        return _t5_closed_form_count(m, vocab_size, tp, ep)
    if m.arch == "bert":
        if rank is not None:
            raise ValueError("a BERT has no pipeline stages; count it without a pipeline rank")
        return _bert_closed_form_count(m, vocab_size, tp)
    return _gpt_closed_form_count(m, vocab_size, tp, ep, rank)


def _gpt_closed_form_count(m: ModelConfig, vocab_size: int, tp: int, ep: int,
                           rank: PipelineRank | None) -> ParameterCount:
    """Parameters of models.gpt.GPT: which tensors are split over TP, which every rank replicates, and
    which are experts (num_experts / ep of them per MoE layer on each rank, replicated over TP).

    Column-parallel layers (weight and bias) and row-parallel weights are split; a row-parallel bias
    (added after the all-reduce) and the norms are replicated. The Llama-style options change the
    shapes, not that rule: grouped-query attention narrows the K and V rows of QKV to num_kv_heads
    heads, SwiGLU adds a column-parallel fc_gate beside fc_in, linear_bias=false drops every bias,
    and an untied output layer is a second vocabulary-sized matrix, column-parallel.

    A pipeline rank holds its own blocks; the first the word embedding (vocabulary-parallel), learned
    positions and the initial recurrent memory (M x h, replicated; memory models have no pipeline yet), the
    last the final norm and the output layer, which when tied is a copy of the word embedding there (one
    matrix when a single rank is both). The total and the active count are the model's, the tied copy
    counted once."""
    h, f, L = m.hidden_size, m.ffn_size, m.num_layers
    norm = 2 * h if m.norm == "layernorm" else h
    row_bias = h if m.biased else 0

    def column_parallel(n_in: int, n_out: int) -> int:
        return n_in * n_out + (n_out if m.biased else 0)

    qkv_rows = (m.num_heads + 2 * m.kv_heads) * m.head_dim
    attention_split = column_parallel(h, qkv_rows) + h * h  # QKV; proj's weight
    mlp_split = (2 if m.swiglu else 1) * column_parallel(h, f) + f * h  # fc_in (and fc_gate); fc_out's weight
    dense_layer = (attention_split + mlp_split, 2 * row_bias + 2 * norm)  # (split, replicated)
    # An MoE layer swaps the MLP for a replicated router (h x experts, no bias) and unsplit experts,
    # each a GeLU MLP with both biases (models.moe.Expert), whatever model.mlp and linear_bias say.
    e, k = (m.moe.num_experts, m.moe.top_k) if m.moe else (0, 0)
    expert = 2 * h * f + f + h
    moe_layer = (attention_split, row_bias + 2 * norm + h * e)

    def held(layer: int) -> tuple[int, int]:
        """(parameters, of which experts) this rank holds of block `layer`."""
        if not m.is_moe_layer(layer):
            return dense_layer[0] // tp + dense_layer[1], 0
        experts = e // ep * expert
        return moe_layer[0] // tp + moe_layer[1] + experts, experts

    word = m.padded_vocab_size(vocab_size) * h  # vocabulary-parallel
    positions = m.max_seq_len * h if m.position_embedding == "learned" else 0  # replicated
    initial_memory = m.memory.num_mem_tokens * h if m.memory else 0  # replicated
    layers, first, last = (range(L), True, True) if rank is None else (rank.layers, rank.first, rank.last)
    ends = ((word // tp + positions + initial_memory if first else 0)
            + (norm + (0 if m.tied and first else word // tp) if last else 0))
    blocks = [held(layer) for layer in layers]
    moe_layers = sum(m.is_moe_layer(layer) for layer in range(L))
    dense_total = ((L - moe_layers) * sum(dense_layer) + moe_layers * sum(moe_layer)
                   + word * (1 if m.tied else 2) + positions + initial_memory + norm)
    return ParameterCount(
        per_rank=sum(n for n, _ in blocks) + ends,
        total=dense_total + moe_layers * e * expert,
        per_layer_per_rank=max((n for n, _ in blocks), default=0),
        experts_per_rank=sum(x for _, x in blocks),
        active=dense_total + moe_layers * k * expert if moe_layers else None,
    )


def _bert_closed_form_count(m: ModelConfig, vocab_size: int, tp: int) -> ParameterCount:
    """Parameters of models.bert.BERT: GPT's blocks (the same attention and MLP, two norms each, wherever
    they sit), and around them what a decoder lacks. The word embedding is vocabulary-parallel and the
    masked-LM head scores against it (tied, counted once); the head adds its own output bias, one per padded
    vocabulary entry and vocabulary-parallel as well. Replicated on every TP rank: the position table,
    position_offset + max_seq_len rows (RoBERTa's 514), a row per token type, one norm on the embeddings
    (post-LN) or after the last block (pre-LN), and the head's transform, a dense h x h layer with its bias
    (whatever linear_bias says) and a norm. This is BertForMaskedLM / RobertaForMaskedLM /
    MegatronBertForMaskedLM's count, padding rows aside."""
    h, f, L = m.hidden_size, m.ffn_size, m.num_layers
    norm = 2 * h if m.norm == "layernorm" else h
    biased = m.biased
    split = (h * 3 * h + (3 * h if biased else 0)) + h * h + (h * f + (f if biased else 0)) + f * h
    replicated = 2 * (h if biased else 0) + 2 * norm  # proj's and fc_out's biases, two norms
    padded = m.padded_vocab_size(vocab_size)
    vocab_parallel = padded * h + padded  # the word embedding, the head's output bias
    ends = (m.first_position + m.max_seq_len) * h + m.token_types * h + norm + (h * h + h) + norm
    return ParameterCount(
        per_rank=L * (split // tp + replicated) + vocab_parallel // tp + ends,
        total=L * (split + replicated) + vocab_parallel + ends,
        per_layer_per_rank=split // tp + replicated,
    )


def _t5_closed_form_count(m: ModelConfig, vocab_size: int, tp: int, ep: int) -> ParameterCount:
    """Parameters of models.t5.T5, which has no biases: per encoder layer one attention and per
    decoder layer two (self and cross), each q, kv and o split over TP; a feed-forward of two (ReLU)
    or three (gated-GeLU) split matrices; an RMSNorm gain per sub-layer, replicated. Each stack adds
    its relative-bias table (split by heads) and a final norm; the embedding, and the output layer
    when untied, are vocabulary-parallel. An MoE layer swaps the feed-forward for a replicated
    router and whole experts, as in GPT."""
    h, f = m.hidden_size, m.ffn_size
    attention = 4 * h * m.num_heads * m.head_dim
    feed_forward = (3 if m.gated else 2) * h * f
    e, k = (m.moe.num_experts, m.moe.top_k) if m.moe else (0, 0)
    expert = 2 * h * f + f + h  # models.moe.Expert: the GPT MLP, with biases

    def layer(attentions: int, moe: bool) -> tuple[int, int, int]:
        """(split, replicated, experts in the whole model) of one block."""
        split = attentions * attention + (0 if moe else feed_forward)
        return split, (attentions + 1) * h + (h * e if moe else 0), e * expert if moe else 0

    layers = [layer(1, m.is_moe_layer(i)) for i in range(m.num_layers)]
    layers += [layer(2, m.is_moe_layer(i)) for i in range(m.decoder_layers)]
    split = m.padded_vocab_size(vocab_size) * h * (1 if m.tied else 2) + 2 * m.num_buckets * m.num_heads
    per_rank_blocks = [s // tp + r + x // ep for s, r, x in layers]
    experts_total = sum(x for _, _, x in layers)
    dense_total = sum(s + r for s, r, _ in layers) + split + 2 * h
    return ParameterCount(
        per_rank=sum(per_rank_blocks) + split // tp + 2 * h,
        total=dense_total + experts_total,
        per_layer_per_rank=max(per_rank_blocks),
        experts_per_rank=experts_total // ep,
        active=dense_total + experts_total // e * k if m.moe else None,
    )


def built_count(m: ModelConfig, vocab_size: int, tp: int, ep: int = 1,
                rank: PipelineRank | None = None) -> ParameterCount:
    """Build rank 0 of a TP=`tp`, EP=`ep` layout on the meta device and count what it holds; the
    model's own parameter_counts() gives the total and active figures a training run prints. With
    `rank`, the stage that pipeline rank builds in training (parallel/pipeline's stage_options: its
    blocks, the embedding on the first, the final norm and output layer on the last), whose
    parameter_counts() are the stage's own."""
    import torch

    from models import build_model
    from models.moe import is_expert_parameter

    stage = {} if rank is None else {"layers": list(rank.layers), "pre_process": rank.first,
                                     "post_process": rank.last}
    with _fake_model_parallel_world(tp, ep if m.moe else None), torch.device("meta"):
        model = build_model(m, vocab_size, expert_parallel_size=ep, **stage)
        total, active = model.parameter_counts()
    parameters = list(model.parameters())
    experts = sum(p.numel() for p in parameters if is_expert_parameter(p))
    return ParameterCount(
        per_rank=sum(p.numel() for p in parameters),
        total=total,
        per_layer_per_rank=max(sum(p.numel() for p in block.parameters()) for block in model.layers()),
        experts_per_rank=experts,
        active=active if experts else None,
    )


def checked_count(m: ModelConfig, vocab_size: int, tp: int, ep: int = 1,
                  rank: PipelineRank | None = None) -> ParameterCount:
    """The closed form, refused unless the meta build agrees. For a pipeline rank the build and the
    closed form must agree on what the GPU holds; the closed form's total is the model's, the build's
    its stage's."""
    built = built_count(m, vocab_size, tp, ep, rank)
    expected = closed_form_count(m, vocab_size, tp, ep, rank)
    if (built if rank is None else held(built)) != (expected if rank is None else held(expected)):
        raise RuntimeError(f"the meta-built model ({built}) disagrees with the closed form ({expected})")
    return expected


def held(count: ParameterCount) -> tuple[int, int, int]:
    """What a GPU holds: its parameters, the largest block's share, its experts."""
    return count.per_rank, count.per_layer_per_rank, count.experts_per_rank


@contextmanager
def _fake_model_parallel_world(tp: int, ep: int | None):
    """tp fake ranks, times ep when the model has experts: DeepSpeed's MoE layer finds its expert
    groups by name, so they are created over a data-parallel dimension of ep ranks, as in training."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("planning builds its own fake process group; run it outside a distributed job")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp * (ep or 1))
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, create_gloo_process_groups=False)
        if ep is None:
            yield
        else:
            with _expert_groups(ep):
                yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@contextmanager
def _expert_groups(ep: int):
    from deepspeed.utils import groups

    from parallel.deepspeed_comm import init_deepspeed_distributed
    from parallel.topology import create_expert_groups

    init_deepspeed_distributed("fake")  # wraps the fake group already set up
    previous_mpu = groups.mpu
    try:
        create_expert_groups(ep)
        yield
    finally:
        groups._release_process_group_references()
        groups.mpu = previous_mpu
