"""BERT: a bidirectional transformer encoder pretrained by masked language modelling (Devlin et al. 2019), as
RoBERTa trains it (Liu et al. 2019) and in Megatron-BERT's pre-LN form (Shoeybi et al. 2019), with
Megatron-style tensor parallelism and optional sequence parallelism.

Reading guide. The input is token, learned position and (optionally) token-type embeddings, summed. Every
block is the GPT's attention and MLP (models/blocks.py) with two differences: attention sees every token,
not only the earlier ones, and the GeLU is the exact (erf) form. Where the LayerNorms sit is the one
difference between the family's members:
- post-LN (BERT, RoBERTa): each residual sum is normalised, x = Norm(x + Attention(x)), then
  Norm(x + MLP(x)), and so are the embeddings;
- pre-LN (Megatron-BERT): each sub-layer reads a normalised input, x + Attention(Norm(x)), with one more
  norm after the last block and none on the embeddings. Megatron found that this is what lets BERT keep
  improving as it grows.
The masked-LM head transforms each position (dense, GeLU, LayerNorm) and scores it against the word
embedding, plus a bias per vocabulary entry. RoBERTa's positions start after its padding id
(model.position_offset 2), which is why its table has 514 rows for 512 tokens.

Tensor parallelism is GPT's: activations are [s, b, h], attention is column- then row-parallel, so is the
MLP. The head's dense layer and norm are small and replicated on every TP rank, and each rank scores its
slice of the vocabulary with its slice of the output bias. Under sequence parallelism the residual stream and
the norms hold this rank's 1/tp of the sequence, gathered whole before the head; replicated parameters applied
to a slice have their gradients summed over the TP group in the graph (parallel/sequence_parallel.py).

There is no padding mask: pretraining packs full windows (RoBERTa's full sentences), and a finite run's
padding rows are not scored.
"""
import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.blocks import (IGNORE_INDEX, MLP, Attention, Norm, language_model_loss, parameter_counts,
                           vocab_parallel_correct)
from models.config import ModelConfig
from models.init import draw_normal, initialise, layer_config, parallel_layer
from parallel.sequence_parallel import (gather_sequence, reduce_scatter_sequence, replicated_parameter,
                                       vocab_parallel_embedding_partial)
from parallel.zero3 import held_values


class Block(nn.Module):
    """Post-LN: Norm(x + Attention(x)), then Norm(x + MLP(x)). Pre-LN: x + Attention(Norm(x)), then
    x + MLP(Norm(x)). The norms keep their names in both forms (attn_norm, mlp_norm)."""

    def __init__(self, cfg: ModelConfig, tp_config: ModelParallelConfig, sequence_parallel: bool):
        super().__init__()
        self.pre_norm, self.sequence_parallel = cfg.pre_norm, sequence_parallel
        self.attn_norm = Norm(cfg, sequence_parallel)
        self.attn = Attention(cfg, tp_config, cfg.init_std, sequence_parallel, causal=False)
        self.mlp_norm = Norm(cfg, sequence_parallel)
        self.mlp = MLP(cfg, tp_config, cfg.init_std, sequence_parallel, gelu_approximate="none")
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if self.pre_norm:
            x = x + self.dropout(self.attn(self._whole_sequence(self.attn_norm(x))))
            return x + self.dropout(self.mlp(self._whole_sequence(self.mlp_norm(x))))
        x = self.attn_norm(x + self.dropout(self.attn(self._whole_sequence(x))))
        return self.mlp_norm(x + self.dropout(self.mlp(self._whole_sequence(x))))

    def _whole_sequence(self, x):
        return gather_sequence(x, parallel_state.get_tensor_model_parallel_group()) if self.sequence_parallel else x


class MaskedLMHead(nn.Module):
    """Each position's output, transformed (dense, exact GeLU, LayerNorm), scored against the word embedding
    plus a bias per vocabulary entry; this TP rank holds the bias of its vocabulary slice."""

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int, sequence_parallel: bool):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        draw_normal(self.dense.weight, cfg.init_std)
        held_values(self.dense.bias)[2].zero_()  # ZeRO-3 has partitioned it already: .data is empty then
        self.norm = Norm(cfg, sequence_parallel)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.bias = nn.Parameter(torch.zeros(padded_vocab_size // tp))
        tensor_parallel.set_tensor_model_parallel_attributes(self.bias, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor, word_embedding: torch.Tensor) -> torch.Tensor:
        """x: [..., h], the same on every TP rank (under sequence parallelism, gathered from the ranks'
        slices). Each rank's gradient reaching the transform is partial, from its vocabulary slice alone: it
        is summed over TP after the transform, or under sequence parallelism by the gather's reduce-scatter
        for x and by replicated_parameter for the transform's own parameters."""
        weight, bias = self.dense.weight, self.dense.bias
        if self.sequence_parallel:
            weight, bias = replicated_parameter(weight), replicated_parameter(bias)
        x = self.norm(F.gelu(F.linear(x, weight, bias)))
        if not self.sequence_parallel:
            x = tensor_parallel.copy_to_tensor_model_parallel_region(x)
        return F.linear(x, word_embedding) + self.bias


class BERT(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        *,
        sequence_parallel: bool = False,
        activation_checkpointing: bool = False,
        expert_parallel_size: int = 1,  # build_model's option for every model; an encoder has none (model.moe is refused)
    ):
        super().__init__()
        self.cfg = cfg
        self.sequence_parallel = sequence_parallel
        self.activation_checkpointing = activation_checkpointing
        self.vocab_size = cfg.padded_vocab_size(vocab_size)
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_config = layer_config(self.tp)

        self.embedding = parallel_layer(
            tensor_parallel.VocabParallelEmbedding, self.vocab_size, cfg.hidden_size, std=cfg.init_std,
            config=tp_config,
        )
        self.position_embedding = self._replicated_embedding(cfg.first_position + cfg.max_seq_len, cfg.hidden_size, cfg.init_std)
        self.token_type_embedding = (
            self._replicated_embedding(cfg.token_types, cfg.hidden_size, cfg.init_std) if cfg.token_types else None
        )
        self.embedding_norm = None if cfg.pre_norm else Norm(cfg, sequence_parallel)
        self.embedding_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, tp_config, sequence_parallel) for _ in range(cfg.num_layers))
        self.final_norm = Norm(cfg, sequence_parallel) if cfg.pre_norm else None
        self.head = MaskedLMHead(cfg, self.vocab_size, sequence_parallel)
        initialise(self, torch.initial_seed())  # the seed the caller gave torch.manual_seed

    @staticmethod
    def _replicated_embedding(rows: int, hidden: int, std: float) -> nn.Embedding:
        """A table every TP rank holds whole. Given a weight, nn.Embedding draws none of its own: initialise
        draws it from the seed and the table's name."""
        embedding = nn.Embedding(rows, hidden, _weight=torch.empty(rows, hidden))
        draw_normal(embedding.weight, std)
        return embedding

    @staticmethod
    def batch_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A masked-LM batch (data_pipeline/masked_lm.py) holds input_ids and labels already: the original token
        at each chosen position, IGNORE_INDEX elsewhere."""
        return batch

    def parameter_counts(self) -> tuple[int, int]:
        return parameter_counts(self, self.cfg, expert_parallel_size=1)

    def layers(self) -> list[Block]:
        return list(self.blocks)

    def moe_metrics(self) -> list[dict]:
        return []

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, reduction: str = "mean",
                token_type_ids: torch.Tensor | None = None):
        """input_ids, labels, token_type_ids (default all 0): [b, s]. With labels, the mean loss over the labels
        that are not IGNORE_INDEX (the masked positions); with reduction="sum", their summed loss and how many
        they are; with reduction="evaluate", those two and how many of them the model's argmax gets right.
        Without labels, this TP rank's vocabulary slice of the logits, [s, b, padded_vocab / tp].

        With labels only the masked positions go through the head, as in fairseq's RoBERTa: scoring the
        vocabulary is most of a small encoder's compute, and the other 85% of positions would be thrown away."""
        x = self.embed(input_ids, token_type_ids)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.activation_checkpointing else block(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.sequence_parallel:
            x = gather_sequence(x, parallel_state.get_tensor_model_parallel_group())
        if labels is None:
            return self.head(x, self.embedding.weight)
        masked = labels.transpose(0, 1) != IGNORE_INDEX  # [s, b]
        logits = self.head(x[masked][:, None, :], self.embedding.weight)  # one sequence of the masked positions
        labels = labels.transpose(0, 1)[masked][None, :]
        if reduction == "evaluate":
            return (*language_model_loss(logits, labels, "sum"), vocab_parallel_correct(logits, labels))
        return language_model_loss(logits, labels, reduction)

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """The first block's input, [s, b, h] (this rank's [s/tp, b, h] under sequence parallelism): word,
        position and token-type embeddings, normalised in the post-LN form."""
        s = input_ids.shape[1]
        positions = torch.arange(self.cfg.first_position, self.cfg.first_position + s, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        position_weight = self.position_embedding.weight
        type_weight = None if self.token_type_embedding is None else self.token_type_embedding.weight
        if self.sequence_parallel:
            partial = vocab_parallel_embedding_partial(self.embedding, input_ids).transpose(0, 1)
            x = reduce_scatter_sequence(partial, parallel_state.get_tensor_model_parallel_group())
            positions = positions.chunk(self.tp)[self.tp_rank]
            token_type_ids = token_type_ids.chunk(self.tp, dim=1)[self.tp_rank]
            position_weight = replicated_parameter(position_weight)
            type_weight = None if type_weight is None else replicated_parameter(type_weight)
        else:
            x = self.embedding(input_ids).transpose(0, 1)
        x = x + position_weight[positions][:, None, :]
        if type_weight is not None:
            x = x + type_weight[token_type_ids.transpose(0, 1)]
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        return self.embedding_dropout(x)
