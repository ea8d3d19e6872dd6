"""T5: an encoder-decoder transformer pretrained by span corruption (Raffel et al. 2020), and its
T5.1.1 variant (gated-GeLU feed-forward, untied output layer), with Megatron-style tensor
parallelism and optional Switch experts (Fedus et al. 2021).

Reading guide. The encoder reads the corrupted text with bidirectional self-attention; the decoder
reads the targets shifted right with causal self-attention plus cross-attention over the encoder's
output. Both add T5's relative position bias to the attention scores instead of position
embeddings: each (key - query) offset falls into one of `num_buckets` buckets, exact for short
offsets and logarithmic up to `max_distance`, and every bucket has one learned scalar per head.
Each stack computes its bias once and every layer reuses it, as T5 does.

Other T5 details, all checked against Hugging Face's T5ForConditionalGeneration (tests/test_t5.py):
- no 1/sqrt(d) scaling of q.k: T5 folds it into the query's initialisation;
- RMSNorm without mean subtraction or bias, before each sub-layer and at the end of each stack;
- no biases in any linear layer;
- one embedding shared by the encoder and decoder inputs; the output layer is that embedding with
  the decoder output scaled by d_model**-0.5 (T5), or a separate matrix, unscaled (T5.1.1).

There is no padding mask: span corruption packs every input and target to its exact length (only
a finite run's last batch has pad rows, and their labels are ignored).

Tensor parallelism is GPT's (models/gpt.py): activations are [s, b, h]; queries, keys/values and
the feed-forward input are column-parallel (each TP rank owns whole heads and a slice of d_ff),
attention output and feed-forward output are row-parallel, so each sub-layer costs one all-reduce
forward and one backward. Each rank keeps the relative-bias columns of its own heads: the bias is
then computed only for the heads the rank attends with, and each column's gradient lives on the
one rank that uses it, with no extra all-reduce. Each rank draws only its slice of every weight,
the bias table included, and one seed gives one model at any TP size (models/init.py).
"""
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.blocks import Norm, language_model_loss, moe_metrics, parameter_counts, vocab_parallel_logits
from models.config import ModelConfig
from models.init import draw_normal, initialise, layer_config, parallel_layer
from models.moe import MoEFeedForward


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Bucket of each offset (key position - query position).

    Bidirectional attention spends half the buckets on keys after the query, half on keys before;
    causal attention sees only keys before (later ones are masked anyway) and gives them all
    buckets. Within a direction, the first half of the buckets are the exact distances 0, 1, ...;
    the second half cover distances up to max_distance on a log scale, and farther keys share the
    last bucket.
    """
    if bidirectional:
        num_buckets //= 2
        direction = (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        direction = 0
        distance = (-relative_position).clamp(min=0)
    exact = num_buckets // 2
    # Distances below `exact` are masked out by the where() below, log(0) included.
    log_scaled = torch.log(distance.float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    far = (exact + log_scaled.long()).clamp(max=num_buckets - 1)
    return direction + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """One learned scalar per (bucket, head), added to the attention scores; this TP rank holds its heads' columns."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional, self.num_buckets, self.max_distance = bidirectional, cfg.num_buckets, cfg.max_distance
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.weight = nn.Parameter(torch.empty(cfg.num_buckets, cfg.num_heads // tp))
        # Split over TP along the heads, so DeepSpeed's gradient norm counts each column once.
        tensor_parallel.set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=1, stride=1)
        draw_normal(self.weight, cfg.hidden_size ** -0.5)

    def forward(self, query_length: int, key_length: int) -> torch.Tensor:
        """[1, local_heads, query_length, key_length], contiguous: a GPU's fused attention kernels refuse
        a mask whose last dimension is strided, and the math kernel they fall back to holds every score."""
        positions = torch.arange(max(query_length, key_length), device=self.weight.device)
        offsets = positions[None, :key_length] - positions[:query_length, None]
        buckets = relative_position_bucket(offsets, self.bidirectional, self.num_buckets, self.max_distance)
        return self.weight.t()[:, buckets].unsqueeze(0)


class Attention(nn.Module):
    """Multi-head attention over `memory` (cross-attention) or over x itself (self-attention).

    Keys and values come from one column-parallel layer whose rows are laid out head by head
    ([k_i, v_i] for each head i), so a contiguous split hands each TP rank whole heads, the same
    heads as its query slice and its relative-bias columns. T5 initialises queries with std
    (d_model x d_kv)**-0.5, which is why the scores are not scaled.
    """

    def __init__(self, cfg: ModelConfig, tp_config: ModelParallelConfig):
        super().__init__()
        tp = tp_config.tensor_model_parallel_size
        h, inner = cfg.hidden_size, cfg.num_heads * cfg.head_dim
        self.head_dim, self.local_heads, self.dropout = cfg.head_dim, cfg.num_heads // tp, cfg.dropout
        self.q = parallel_layer(
            tensor_parallel.ColumnParallelLinear, h, inner, std=(h * cfg.head_dim) ** -0.5, config=tp_config,
            bias=False, gather_output=False,
        )
        self.kv = parallel_layer(
            tensor_parallel.ColumnParallelLinear, h, 2 * inner, std=h ** -0.5, config=tp_config, bias=False,
            gather_output=False,
        )
        self.o = parallel_layer(
            tensor_parallel.RowParallelLinear, inner, h, std=inner ** -0.5, config=tp_config, bias=False,
            input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, x, bias: torch.Tensor | None = None, memory: torch.Tensor | None = None):
        """x: [s, b, h]; bias: added to the scores, broadcast to [b, local_heads, s, s_memory]."""
        s, b, _ = x.shape
        q, _ = self.q(x)
        kv, _ = self.kv(x if memory is None else memory)
        q = q.view(s, b, self.local_heads, self.head_dim).permute(1, 2, 0, 3)
        kv = kv.view(kv.shape[0], b, self.local_heads, 2 * self.head_dim).permute(1, 2, 0, 3)
        k, v = kv.split(self.head_dim, dim=-1)  # each [b, local_heads, s_memory, head_dim]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, scale=1.0, dropout_p=self.dropout if self.training else 0.0
        )
        out, _ = self.o(y.permute(2, 0, 1, 3).reshape(s, b, self.local_heads * self.head_dim))
        return out


class FeedForward(nn.Module):
    """wo(relu(wi x)) in T5; wo(gelu(wi_0 x) * wi_1 x) in T5.1.1 (GeGLU, Shazeer 2020). The input
    layers are column-parallel, the output layer row-parallel."""

    def __init__(self, cfg: ModelConfig, tp_config: ModelParallelConfig):
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_size

        def column_parallel():
            return parallel_layer(
                tensor_parallel.ColumnParallelLinear, h, f, std=h ** -0.5, config=tp_config, bias=False,
                gather_output=False,
            )

        self.wi = column_parallel()
        self.wi_gate = column_parallel() if cfg.gated else None
        self.wo = parallel_layer(
            tensor_parallel.RowParallelLinear, f, h, std=f ** -0.5, config=tp_config, bias=False,
            input_is_parallel=True, skip_bias_add=False,
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h, _ = self.wi(x)
        if self.wi_gate is None:
            h = F.relu(h)
        else:
            h = F.gelu(h, approximate="tanh") * self.wi_gate(x)[0]
        out, _ = self.wo(self.dropout(h))
        return out


class Block(nn.Module):
    """Encoder: x + SelfAttention(Norm(x)), then x + FeedForward(Norm(x)). The decoder's self-attention
    is causal, and a cross-attention over the encoder output sits between the two."""

    def __init__(self, cfg: ModelConfig, tp_config: ModelParallelConfig, is_decoder: bool,
                 moe_expert_parallel_size: int | None):
        super().__init__()
        self.self_attn_norm = Norm(cfg, sequence_parallel=False)
        self.self_attn = Attention(cfg, tp_config)
        if is_decoder:
            self.cross_attn_norm = Norm(cfg, sequence_parallel=False)
            self.cross_attn = Attention(cfg, tp_config)
        self.ff_norm = Norm(cfg, sequence_parallel=False)
        if moe_expert_parallel_size is None:
            self.ff = FeedForward(cfg, tp_config)
        else:  # Switch-T5: the feed-forward is a layer of experts
            self.ff = MoEFeedForward(cfg, moe_expert_parallel_size, output_std=cfg.ffn_size ** -0.5)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, bias, memory=None):
        x = x + self.dropout(self.self_attn(self.self_attn_norm(x), bias))
        if memory is not None:
            x = x + self.dropout(self.cross_attn(self.cross_attn_norm(x), memory=memory))
        return x + self.dropout(self.ff(self.ff_norm(x)))


class Stack(nn.Module):
    """The encoder (is_decoder False) or the decoder: embedded tokens in, normalised states out."""

    def __init__(self, cfg: ModelConfig, tp_config: ModelParallelConfig, is_decoder: bool, num_layers: int,
                 expert_parallel_size: int, activation_checkpointing: bool):
        super().__init__()
        self.is_decoder, self.activation_checkpointing = is_decoder, activation_checkpointing
        self.relative_bias = RelativePositionBias(cfg, bidirectional=not is_decoder)
        self.blocks = nn.ModuleList(
            Block(cfg, tp_config, is_decoder, expert_parallel_size if cfg.is_moe_layer(layer) else None)
            for layer in range(num_layers)
        )
        self.final_norm = Norm(cfg, sequence_parallel=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, memory=None):  # x: [s, b, h]
        s = x.shape[0]
        bias = self.relative_bias(s, s)  # once per stack, shared by every layer
        if self.is_decoder:
            bias = bias + torch.full((s, s), float("-inf"), dtype=bias.dtype, device=x.device).triu(1)
        x = self.dropout(x)
        for block in self.blocks:
            if self.activation_checkpointing:
                x = checkpoint(block, x, bias, memory, use_reentrant=False)
            else:
                x = block(x, bias, memory)
        return self.dropout(self.final_norm(x))


class T5(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        *,
        sequence_parallel: bool = False,
        activation_checkpointing: bool = False,
        expert_parallel_size: int = 1,
    ):
        super().__init__()
        if sequence_parallel:  # the config refuses it with a one-line message; this guards direct use
            raise ValueError("T5 does not support sequence parallelism")
        self.cfg, self.expert_parallel_size = cfg, expert_parallel_size
        self.vocab_size = cfg.padded_vocab_size(vocab_size)
        tp_config = layer_config(parallel_state.get_tensor_model_parallel_world_size())
        self.embedding = parallel_layer(
            tensor_parallel.VocabParallelEmbedding, self.vocab_size, cfg.hidden_size, std=1.0, config=tp_config
        )
        self.encoder = Stack(cfg, tp_config, False, cfg.num_layers, expert_parallel_size, activation_checkpointing)
        self.decoder = Stack(cfg, tp_config, True, cfg.decoder_layers, expert_parallel_size, activation_checkpointing)
        # Untied (T5.1.1): std d_model**-0.5 gives the logits the scale the tied layer gets from its
        # rescaled input (Hugging Face draws std 1.0, which starts training at a loss near 25).
        self.lm_head = None if cfg.tied else parallel_layer(
            tensor_parallel.ColumnParallelLinear, cfg.hidden_size, self.vocab_size, std=cfg.hidden_size ** -0.5,
            config=tp_config, bias=False, gather_output=False,
        )
        self.moe_layers = [m for m in self.modules() if isinstance(m, MoEFeedForward)]
        initialise(self, torch.initial_seed())  # the seed the caller gave torch.manual_seed

    @staticmethod
    def batch_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A T5 batch (data_pipeline's span corruption) already holds input_ids, decoder_input_ids and labels."""
        return batch

    def parameter_counts(self) -> tuple[int, int]:
        return parameter_counts(self, self.cfg, self.expert_parallel_size)

    def layers(self) -> list[Block]:
        """The encoder's layers, then the decoder's."""
        return [*self.encoder.blocks, *self.decoder.blocks]

    def moe_metrics(self) -> list[dict]:
        return moe_metrics(dict(enumerate(block.ff for block in self.layers())))

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                reduction: str = "mean"):
        """input_ids: [b, s_in]; decoder_input_ids, labels: [b, s_out]. With labels, the mean loss over
        the labels that are not IGNORE_INDEX plus the MoE router losses (the training objective), or
        with reduction="sum" (evaluation) their summed loss and how many they are. Without labels,
        this TP rank's vocabulary slice of the logits, [s_out, b, padded_vocab / tp]."""
        memory = self.encoder(self.embedding(input_ids).transpose(0, 1))
        x = self.decoder(self.embedding(decoder_input_ids).transpose(0, 1), memory)
        if self.lm_head is None:  # tied: the embedding scores the decoder output scaled by d_model**-0.5
            logits = vocab_parallel_logits(x * self.cfg.hidden_size ** -0.5, self.embedding.weight, False)
        else:
            logits, _ = self.lm_head(x)
        if labels is None:
            return logits
        if reduction in ("sum", "evaluate"):  # evaluation counts nothing beside the loss
            return language_model_loss(logits, labels, "sum")
        return language_model_loss(logits, labels) + sum(moe.router_loss for moe in self.moe_layers)
