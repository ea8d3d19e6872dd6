"""What the models are built from: the norm, the vocabulary-parallel output layer and loss, the
per-layer MoE figures and parameter counts (GPT, its Llama-style variant, T5, BERT), and the
attention and MLP sub-layers that GPT and BERT share.

The output layer and the loss are Megatron's: each tensor-parallel (TP) rank scores its slice of
the (padded) vocabulary, and `vocab_parallel_cross_entropy` finds the softmax over the whole of it
with two all-reduces of [s, b] figures instead of gathering [s, b, vocab] logits.
"""
import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from models.config import ModelConfig
from models.moe import MoEFeedForward, is_expert_parameter
from models.init import parallel_layer
from parallel.sequence_parallel import gather_sequence, replicated_parameter, row_parallel_reduce_scatter
from parallel.zero3 import full_shape

IGNORE_INDEX = -100  # label of a position that is not scored (Hugging Face's convention)


class Norm(nn.Module):
    """LayerNorm or RMSNorm (Zhang & Sennrich 2019), replicated on every TP rank."""

    def __init__(self, cfg: ModelConfig, sequence_parallel: bool):
        super().__init__()
        self.kind, self.eps, self.sequence_parallel = cfg.norm, cfg.norm_eps, sequence_parallel
        self.weight = nn.Parameter(torch.ones(cfg.hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.hidden_size)) if cfg.norm == "layernorm" else None

    def _replicated(self, p):
        # Under sequence parallelism each TP rank normalises different tokens: sum the gradient.
        return replicated_parameter(p) if self.sequence_parallel else p

    def forward(self, x):
        shape = (x.shape[-1],)
        if self.kind == "rmsnorm":
            return F.rms_norm(x, shape, self._replicated(self.weight), self.eps)
        return F.layer_norm(x, shape, self._replicated(self.weight), self._replicated(self.bias), self.eps)


def vocab_parallel_logits(x: torch.Tensor, weight: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """This rank's vocabulary slice of the logits of x [s, b, h] (this rank's [s/tp, b, h] under
    sequence parallelism): the whole sequence, [s, b, vocab / tp]. `weight` is the rank's rows of the
    output layer (the embedding, when tied). Every rank's gradient reaching x is partial, so it is
    summed over the TP group on the way back (reduce-scattered, under sequence parallelism)."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    if sequence_parallel:
        x = gather_sequence(x, tp_group)
    else:
        x = tensor_parallel.copy_to_tensor_model_parallel_region(x)
    return F.linear(x, weight)


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
    """Cross-entropy of vocabulary-parallel logits [s, b, vocab / tp] against labels [b, s], over the
    labels that are not IGNORE_INDEX: their mean (training), or with reduction="sum" (evaluation)
    their sum and how many they are, so that a mean over any split of the data is exact."""
    labels = labels.transpose(0, 1)
    scored = labels != IGNORE_INDEX
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.clamp(min=0).contiguous())
    total = (losses * scored).sum()
    if reduction == "sum":
        return total, scored.sum()
    return total / scored.sum().clamp(min=1)


def vocab_parallel_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many scored labels [b, s] are the argmax of vocabulary-parallel logits [s, b, vocab / tp] over the
    whole (padded) vocabulary: a label is right when its logit is the largest, which two all-reduces of [s, b]
    figures over TP tell, as they tell the loss, instead of gathering the logits."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    logits, labels = logits.detach().float(), labels.transpose(0, 1)
    per_rank = logits.shape[-1]
    largest = logits.max(dim=-1).values
    torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    local = labels - parallel_state.get_tensor_model_parallel_rank() * per_rank
    held = (local >= 0) & (local < per_rank)
    label_logit = logits.gather(-1, local.clamp(0, per_rank - 1).unsqueeze(-1)).squeeze(-1) * held
    torch.distributed.all_reduce(label_logit, group=tp_group)
    return ((label_logit >= largest) & (labels != IGNORE_INDEX)).sum()


def moe_metrics(feed_forwards: dict[int, nn.Module]) -> list[dict]:
    """Per MoE layer, numbered by its block's index in the model (`feed_forwards` maps it to the block's
    feed-forward), from the last forward: tokens routed to each expert, the dropped fraction and the
    router losses."""
    return [
        {"layer": layer, **{name: value.tolist() for name, value in ff.metrics.items()}}
        for layer, ff in feed_forwards.items() if isinstance(ff, MoEFeedForward)
    ]


def parameter_counts(model: nn.Module, cfg: ModelConfig, expert_parallel_size: int) -> tuple[int, int]:
    """(total, active per token) over the whole model, not just this rank's shard: a token meets
    every dense parameter but only top_k of each MoE layer's experts."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    total = active = 0
    for p in model.parameters():
        n = full_shape(p).numel()  # ZeRO-3 leaves an empty tensor in p
        if getattr(p, "tensor_model_parallel", False):
            n *= tp
        if is_expert_parameter(p):  # each rank holds num_experts / ep of them, replicated over TP
            n *= expert_parallel_size
            total, active = total + n, active + n * cfg.moe.top_k / cfg.moe.num_experts
        else:
            total, active = total + n, active + n
    return total, int(active)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021), applied to queries and keys."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x):  # x: [b, heads, s, head_dim]
        s = x.shape[2]
        cos, sin = self.cos[:s].to(x.dtype), self.sin[:s].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return rotated.flatten(-2)


class Attention(nn.Module):
    """Self-attention, causal (GPT) or bidirectional (BERT); this TP rank computes num_heads / tp of the query heads.

    With grouped-query attention, each key/value head is shared by a group of num_heads / kv_heads
    consecutive query heads (multi-head attention is the case of groups of one). The QKV rows are
    laid out group by group, [q_g0 ... q_g(r-1), k_g, v_g] for each key/value head g, so splitting
    the output features contiguously over TP ranks hands each rank whole groups.
    """

    def __init__(self, cfg: ModelConfig, tp_config: ModelParallelConfig, output_std: float, sequence_parallel: bool,
                 causal: bool = True):
        super().__init__()
        tp = tp_config.tensor_model_parallel_size
        self.causal = causal
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.local_kv_heads = cfg.kv_heads // tp
        self.group_size = cfg.num_heads // cfg.kv_heads  # query heads per key/value head
        self.dropout = cfg.dropout
        self.sequence_parallel = sequence_parallel
        self.qkv = parallel_layer(
            tensor_parallel.ColumnParallelLinear, cfg.hidden_size, (cfg.num_heads + 2 * cfg.kv_heads) * self.head_dim,
            std=cfg.init_std, config=tp_config, bias=cfg.biased, gather_output=False,
            disable_grad_reduce=sequence_parallel,
        )
        self.proj = parallel_layer(
            tensor_parallel.RowParallelLinear, cfg.hidden_size, cfg.hidden_size, std=output_std, config=tp_config,
            bias=cfg.biased, input_is_parallel=True, skip_bias_add=False,
        )
        self.rotary = (
            Rotary(self.head_dim, cfg.max_seq_len, cfg.rotary_base) if cfg.position_embedding == "rotary" else None
        )

    def forward(self, x, attn_mask=None):
        """x: [s, b, h], the whole sequence; returns this rank's slice under sequence parallelism. attn_mask
        (recurrent memory only): [s, s] booleans, True where a query may attend to a key; None: causal, or every
        key for a bidirectional attention."""
        s, b, _ = x.shape
        qkv, _ = self.qkv(x)
        groups = qkv.view(s, b, self.local_kv_heads, (self.group_size + 2) * self.head_dim).permute(1, 2, 0, 3)
        q, k, v = groups.split([self.group_size * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        # [b, kv_heads, s, r x head_dim] -> [b, kv_heads x r, s, head_dim]: query head g x r + j uses key/value head g
        q = q.reshape(b, self.local_kv_heads, s, self.group_size, self.head_dim).transpose(2, 3).flatten(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=self.causal and attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.group_size > 1,
        )
        y = y.permute(2, 0, 1, 3).reshape(s, b, -1)
        return row_parallel(self.proj, y, self.sequence_parallel)


class MLP(nn.Module):
    """fc_out(gelu(fc_in x)) (GPT), or fc_out(silu(fc_gate x) * fc_in x) (SwiGLU, Llama); the input
    layers are column-parallel, so each TP rank gates its own slice of the hidden features. GPT-2's GeLU
    is the tanh approximation, BERT's the exact (erf) form: gelu_approximate is torch's name for it."""

    def __init__(self, cfg: ModelConfig, tp_config: ModelParallelConfig, output_std: float, sequence_parallel: bool,
                 gelu_approximate: str = "tanh"):
        super().__init__()
        self.sequence_parallel, self.gelu_approximate = sequence_parallel, gelu_approximate

        def column_parallel():
            return parallel_layer(
                tensor_parallel.ColumnParallelLinear, cfg.hidden_size, cfg.ffn_size, std=cfg.init_std,
                config=tp_config, bias=cfg.biased, gather_output=False, disable_grad_reduce=sequence_parallel,
            )

        self.fc_in = column_parallel()
        self.fc_gate = column_parallel() if cfg.swiglu else None
        self.fc_out = parallel_layer(
            tensor_parallel.RowParallelLinear, cfg.ffn_size, cfg.hidden_size, std=output_std, config=tp_config,
            bias=cfg.biased, input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, x):
        h, _ = self.fc_in(x)
        if self.fc_gate is None:
            h = F.gelu(h, approximate=self.gelu_approximate)
        else:
            h = F.silu(self.fc_gate(x)[0]) * h
        return row_parallel(self.fc_out, h, self.sequence_parallel)


def row_parallel(layer, x, sequence_parallel: bool):
    """A row-parallel layer's output summed over TP: all-reduced (megatron's layer), or under sequence
    parallelism reduce-scattered, this rank keeping its slice of the sequence."""
    if sequence_parallel:
        return row_parallel_reduce_scatter(layer, x, parallel_state.get_tensor_model_parallel_group())
    out, _ = layer(x)
    return out
