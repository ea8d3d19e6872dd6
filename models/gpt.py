"""GPT: a decoder-only transformer language model (Radford et al. 2018, 2019), with Megatron-style
tensor parallelism (Shoeybi et al. 2019) and optional sequence parallelism (Korthikanti et al. 2022).

The same model, with options, is the Llama-style decoder (Touvron et al. 2023): rotary positions
(Su et al. 2021), RMSNorm, a SwiGLU MLP (Shazeer 2020), grouped-query attention (Ainslie et al.
2023), no biases in the linear layers and an output layer of its own (configs/llama-*.yaml).

Reading guide. Activations are sequence-first, [s, b, h], as in Megatron, because sequence
parallelism splits dim 0. Every weight matrix is a megatron-core column- or row-parallel layer:
a column-parallel layer splits its output features over the tensor-parallel (TP) ranks, a
row-parallel layer splits its input features and all-reduces its output. Attention is QKV
column-parallel (each TP rank owns whole key/value heads and the query heads that share them)
followed by a row-parallel output projection; the MLP is column-parallel -> GeLU (or SwiGLU) ->
row-parallel. So each block costs one all-reduce forward and one backward per sub-layer, the f/g
scheme of the Megatron paper.

With sequence parallelism, the norms, dropout and residual stream hold only this rank's 1/tp of
the sequence, as in Megatron: the sequence is all-gathered on entry to each parallel sub-layer, and
the row-parallel layer's partial sums are reduce-scattered on exit instead of all-reduced, so TP
moves no more bytes than without it (parallel/sequence_parallel.py). The embedding's partial
lookups are reduce-scattered the same way. Parameters every rank holds whole but applies to its
own slice (norms, row-parallel biases, position embeddings) have their gradients summed over the
TP group in the graph itself, which keeps them correct under any engine or ZeRO stage.

Weights are a function of the seed, not of the layout: each rank draws only its own slice, and one
seed gives one model at every TP and EP size (models/init.py).
"""
import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.blocks import (IGNORE_INDEX, MLP, Attention, Norm, language_model_loss, moe_metrics, parameter_counts,
                           vocab_parallel_logits)
from models.config import ModelConfig
from models.init import draw_normal, initialise, layer_config, parallel_layer
from models.moe import MoEFeedForward
from parallel.sequence_parallel import (gather_sequence, reduce_scatter_sequence, replicated_parameter, split_sequence,
                                       vocab_parallel_embedding_partial)


class Block(nn.Module):
    """x + Attention(Norm(x)), then x + MLP(Norm(x)); the MLP is a mixture of experts in MoE layers."""

    def __init__(self, cfg: ModelConfig, tp_config: ModelParallelConfig, output_std: float,
                 sequence_parallel: bool, moe_expert_parallel_size: int | None):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.attn_norm = Norm(cfg, sequence_parallel)
        self.attn = Attention(cfg, tp_config, output_std, sequence_parallel)
        self.mlp_norm = Norm(cfg, sequence_parallel)
        if moe_expert_parallel_size is None:
            self.mlp = MLP(cfg, tp_config, output_std, sequence_parallel)
        else:
            self.mlp = MoEFeedForward(cfg, moe_expert_parallel_size, output_std)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, attn_mask=None):
        x = x + self.dropout(self.attn(self._whole_sequence(self.attn_norm(x)), attn_mask))
        return x + self.dropout(self._mlp(self._whole_sequence(self.mlp_norm(x))))

    def _whole_sequence(self, x):
        return gather_sequence(x, parallel_state.get_tensor_model_parallel_group()) if self.sequence_parallel else x

    def _mlp(self, x):
        out = self.mlp(x)
        # The dense MLP's row-parallel layer leaves this rank's slice; the experts' output is whole.
        if self.sequence_parallel and isinstance(self.mlp, MoEFeedForward):
            return split_sequence(out, parallel_state.get_tensor_model_parallel_group())
        return out


class MemoryTokens(nn.Module):
    """The recurrent memory's initial state: num_mem_tokens learned vectors, distinct (LM-RMT repeats one),
    drawn like the embedding, N(0, init_std), whole on every TP rank (models/init.py draws a replicated tensor
    from the seed and its name, so every layout has the same). A module of its own, so ZeRO-3 gathers it
    when it is used."""

    def __init__(self, cfg: ModelConfig, sequence_parallel: bool):
        super().__init__()
        shape = (cfg.memory.num_mem_tokens, cfg.hidden_size)
        self.weight = draw_normal(nn.Parameter(torch.empty(shape)), cfg.init_std)
        self.sequence_parallel = sequence_parallel

    def forward(self, batch_size: int) -> torch.Tensor:  # [M, b, h]
        # Under sequence parallelism each TP rank's gradient of the memory is partial (GPT.read_segment): sum it.
        weight = replicated_parameter(self.weight) if self.sequence_parallel else self.weight
        return weight[:, None, :].expand(-1, batch_size, -1)


def memory_attention_mask(num_mem_tokens: int, num_tokens: int, device) -> torch.Tensor:
    """Who sees whom in a segment [read memory; tokens; write memory] (True: may attend): read memory sees
    all read memory, a token sees the read memory and the tokens up to itself, write memory sees the whole
    segment. [s, s] with s = num_tokens + 2 x num_mem_tokens."""
    m, s = num_mem_tokens, num_tokens + 2 * num_mem_tokens
    mask = torch.ones(s, s, dtype=torch.bool, device=device).tril()
    mask[:m, :m] = True
    mask[m + num_tokens:, :] = True
    return mask


class GPT(nn.Module):
    """The decoder, or under pipeline parallelism one stage of it: the blocks `layers` names (global
    indices, all by default), with the embedding on the stage that reads tokens (`pre_process`) and
    the final norm, output layer and loss on the stage that scores them (`post_process`), as in
    Megatron. Parameters keep the whole model's names (blocks.<global index>....), so a stage draws
    the weights the whole model has, and a checkpoint does not depend on the split. A tied output
    layer on a last stage that is not also the first holds its own copy of the embedding, which the
    pipeline keeps equal to the first stage's (parallel/pipeline/tied.py)."""

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        *,
        sequence_parallel: bool = False,
        activation_checkpointing: bool = False,
        expert_parallel_size: int = 1,
        layers: Sequence[int] | None = None,
        pre_process: bool = True,
        post_process: bool = True,
    ):
        super().__init__()
        self.cfg = cfg
        self.sequence_parallel = sequence_parallel
        self.activation_checkpointing = activation_checkpointing
        self.expert_parallel_size = expert_parallel_size
        self.vocab_size = cfg.padded_vocab_size(vocab_size)
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_config = layer_config(self.tp)
        # GPT-2's scaled init: each residual branch's output projection is shrunk by
        # sqrt(2 x layers) so the residual stream's variance does not grow with depth.
        output_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)

        self.embedding = self.position_embedding = self.final_norm = self.output_layer = None
        if pre_process or (post_process and cfg.tied):
            self.embedding = parallel_layer(
                tensor_parallel.VocabParallelEmbedding, self.vocab_size, cfg.hidden_size, std=cfg.init_std,
                config=tp_config,
            )
        if pre_process and cfg.position_embedding == "learned":  # given a weight, nn.Embedding draws none of its own
            shape = (cfg.max_seq_len, cfg.hidden_size)
            self.position_embedding = nn.Embedding(*shape, _weight=torch.empty(shape))
            draw_normal(self.position_embedding.weight, cfg.init_std)
        self.embedding_dropout = nn.Dropout(cfg.dropout)
        self.memory = MemoryTokens(cfg, sequence_parallel) if cfg.memory is not None else None
        self.blocks = nn.ModuleDict({
            str(layer): Block(cfg, tp_config, output_std, sequence_parallel,
                              expert_parallel_size if cfg.is_moe_layer(layer) else None)
            for layer in (range(cfg.num_layers) if layers is None else layers)
        })
        if post_process:
            self.final_norm = Norm(cfg, sequence_parallel)
            # The output layer is the input embedding (tied, GPT-2) or a vocabulary-parallel matrix of its own (Llama).
            if not cfg.tied:
                self.output_layer = parallel_layer(
                    tensor_parallel.ColumnParallelLinear, cfg.hidden_size, self.vocab_size, std=cfg.init_std,
                    config=tp_config, bias=False, gather_output=False,
                )
        initialise(self, torch.initial_seed())  # the seed the caller gave torch.manual_seed

    @staticmethod
    def batch_inputs(batch: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A GPT batch is token windows [b, s + 1], every position trained to predict the next token, or
        input_ids and labels already (a task that scores some tokens only, data_pipeline/fact_task.py)."""
        if isinstance(batch, dict):
            return batch
        return {"input_ids": batch[:, :-1], "labels": batch[:, 1:]}

    def parameter_counts(self) -> tuple[int, int]:
        return parameter_counts(self, self.cfg, self.expert_parallel_size)

    def layers(self) -> list[Block]:
        return list(self.blocks.values())

    def moe_metrics(self) -> list[dict]:
        return moe_metrics({int(layer): block.mlp for layer, block in self.blocks.items()})

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, reduction: str = "mean", *,
                segment: bool = False, memory: torch.Tensor | None = None):
        """input_ids, labels: [b, s]. With labels, the mean next-token loss plus the MoE router losses
        (the training objective), or with reduction="sum" (evaluation) the summed next-token loss and
        the number of tokens scored, so that a mean over any split of the data is exact. Without
        labels, this TP rank's vocabulary slice of the logits, [s, b, padded_vocab / tp]. With recurrent
        memory (model.memory), the same over the segments of input_ids (forward_with_memory).

        segment (recurrent memory, an input read a segment at a time, launcher/evaluate_fact_task.py):
        input_ids is one segment, read with `memory` (None: the initial memory); returns this rank's slice of
        the logits at its last token, [1, b, padded_vocab / tp], and the memory it writes. Through forward,
        so that under ZeRO-3 the engine gathers every parameter it reads."""
        if reduction == "evaluate":  # a decoder counts nothing beside its loss
            reduction = "sum"
        if segment:
            x, written = self.read_segment(input_ids, self.initial_memory(len(input_ids)) if memory is None else memory)
            return self.head(x[-1:], from_segment=True), written
        if self.memory is not None:
            return self.forward_with_memory(input_ids, labels, reduction)
        x = self.run_layers(self.embed(input_ids), self.blocks)
        if labels is None or reduction == "sum":
            return self.head(x, labels, reduction)
        return self.head(x, labels) + self.router_loss(self.blocks)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The input of the first block, [s, b, h]: token and (learned) position embeddings, identical
        on every TP rank; under sequence parallelism the partial lookups are reduce-scattered instead of
        all-reduced, and this rank gets its slice of the sequence, [s/tp, b, h]."""
        if self.sequence_parallel:
            partial = vocab_parallel_embedding_partial(self.embedding, input_ids).transpose(0, 1)
            x = reduce_scatter_sequence(partial, parallel_state.get_tensor_model_parallel_group())
        else:
            x = self.embedding(input_ids).transpose(0, 1)
        return self.embedding_dropout(self._add_positions(x, input_ids.shape[1]))

    def _add_positions(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """x, a sequence of `length` positions (this rank's slice of it under sequence parallelism), plus its
        learned position embeddings, if the model has them."""
        if self.position_embedding is None:
            return x
        positions = torch.arange(length, device=x.device)
        weight = self.position_embedding.weight
        if self.sequence_parallel:
            positions, weight = positions.chunk(self.tp, dim=0)[self.tp_rank], replicated_parameter(weight)
        return x + weight[positions][:, None, :]

    def run_layers(self, x: torch.Tensor, layers: Iterable[str | int], attn_mask: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """x through the blocks `layers` names (global indices), in order; attn_mask: see Attention.forward."""
        for layer in layers:
            block = self.blocks[str(layer)]
            if self.activation_checkpointing:
                x = checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask)
        return x

    def forward_with_memory(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                            reduction: str = "mean"):
        """The recurrent memory transformer's forward (decoder form of LM-RMT; docs/memory.md), with forward's
        arguments and results. input_ids [b, s] is cut into segments of model.memory.segment_len tokens (the
        last may be shorter), each read by read_segment; the first reads the learned initial memory. Memory
        positions are never scored: the loss is the mean over every scored token of every segment, plus the
        MoE router losses of every segment's forward (each segment routes its own tokens). Only the memory
        read by the last `bptt_segments` segments carries gradient back into the segment that wrote it (all of
        them for -1)."""
        mem_cfg = self.cfg.memory
        segments = input_ids.split(mem_cfg.segment_len, dim=1)
        label_segments = labels.split(mem_cfg.segment_len, dim=1) if labels is not None else [None] * len(segments)
        bptt = len(segments) if mem_cfg.bptt_segments == -1 else mem_cfg.bptt_segments
        memory = self.initial_memory(input_ids.shape[0])
        logits, total, scored, router_loss = [], 0.0, 0, 0.0
        for i, (ids, seg_labels) in enumerate(zip(segments, label_segments)):
            if i > 0 and i < len(segments) - bptt:
                memory = memory.detach()  # truncated BPTT: this segment's loss stops at the memory it reads
            x, memory = self.read_segment(ids, memory)
            if seg_labels is None:
                logits.append(self.head(x, from_segment=True))
            else:
                seg_total, seg_scored = self.score_segment(x, seg_labels)
                total, scored = total + seg_total, scored + seg_scored
                if reduction == "mean":
                    router_loss = router_loss + self.router_loss(self.blocks)
        if labels is None:
            return torch.cat(logits, dim=0)
        if reduction == "sum":
            return total, scored
        return total / scored.clamp(min=1) + router_loss

    def initial_memory(self, batch_size: int) -> torch.Tensor:
        """The memory the first segment reads, [M, b, h]."""
        return self.memory(batch_size)

    def read_segment(self, ids: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One segment of tokens ids [b, L] with the memory it reads [M, b, h], run as [read memory; tokens;
        write memory] at positions 0..M-1, M..M+L-1 and M+L..L+2M-1: the last block's output at its tokens,
        [L, b, h], and the memory it writes, the final norm of the last block's output at the write positions,
        [M, b, h]: normalised, the memory keeps one scale however many segments it crosses (docs/memory.md). Evaluation and generation call it a segment at a time, so their memory does not grow
        with the input; score its token outputs with score_segment or head(x, from_segment=True).

        Under sequence parallelism the segment, not the window, is split over the TP ranks (L + 2M must be
        divisible by tp): each rank puts in its vocabulary slice's token rows and 1/tp of the memory, and one
        reduce-scatter sums them into each rank's slice of the segment, as embed does for the plain model. The
        last block's slices are all-gathered on the way out, so both outputs are whole on every rank; the
        gather's backward sums the ranks' gradients, so what a rank computes from the outputs (its vocabulary
        slice of the logits, its share of the next segment) gives a partial gradient, and the initial memory,
        whole on every rank, has its gradient summed over TP (MemoryTokens)."""
        m, length = self.cfg.memory.num_mem_tokens, ids.shape[1]
        if self.sequence_parallel:
            if (length + 2 * m) % self.tp:
                raise ValueError(f"a segment of {length} tokens and 2 x {m} memory tokens cannot be split over "
                                 f"{self.tp} sequence-parallel ranks")
            tp_group = parallel_state.get_tensor_model_parallel_group()
            share = memory / self.tp
            tokens = vocab_parallel_embedding_partial(self.embedding, ids).transpose(0, 1)
            x = reduce_scatter_sequence(torch.cat([share, tokens, share], dim=0), tp_group)
        else:
            x = torch.cat([memory, self.embedding(ids).transpose(0, 1), memory], dim=0)  # whole on every TP rank
        x = self.embedding_dropout(self._add_positions(x, length + 2 * m))
        x = self.run_layers(x, self.blocks, memory_attention_mask(m, length, x.device))
        if self.sequence_parallel:
            x = gather_sequence(x, tp_group)
        return x[m:m + length], self.final_norm(x[m + length:])

    def score_segment(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed next-token loss of a segment's outputs x [L, b, h] (read_segment's) and how many tokens it
        scores. Only the scored positions reach the output layer: a task that scores one answer token in
        thousands (data.fact_task) would otherwise spend most of its time on logits nobody reads. Under sequence
        parallelism x is whole (read_segment gathers it), so picking positions needs no collective, and the
        scored positions, however few, need not divide over the TP ranks."""
        scored = labels != IGNORE_INDEX
        if bool(scored.all()):
            return self.head(x, labels, reduction="sum", from_segment=True)
        picked = scored.transpose(0, 1)  # [L, b], as x
        return self.head(x[picked][:, None, :], labels.transpose(0, 1)[picked][None, :], reduction="sum",
                         from_segment=True)

    def router_loss(self, layers: Iterable[str | int]) -> torch.Tensor | float:
        """The MoE router losses of the blocks `layers` names, from their last forward (0 for dense blocks)."""
        mlps = (self.blocks[str(layer)].mlp for layer in layers)
        return sum(mlp.router_loss for mlp in mlps if isinstance(mlp, MoEFeedForward))

    def head(self, x: torch.Tensor, labels: torch.Tensor | None = None, reduction: str = "mean", *,
             from_segment: bool = False):
        """The last block's output scored: this TP rank's slice of the logits without labels, else the
        next-token loss (mean, or with reduction="sum" the sum and the number of tokens scored). from_segment:
        x is read_segment's output, which under sequence parallelism is already whole, its gradient summed over
        TP by read_segment's gather, so the logits are x times this rank's rows, with neither gather nor copy."""
        x = self.final_norm(x)
        head = self.embedding.weight if self.output_layer is None else self.output_layer.weight
        if from_segment and self.sequence_parallel:
            logits = F.linear(x, head)
        else:
            logits = vocab_parallel_logits(x, head, self.sequence_parallel)
        return logits if labels is None else language_model_loss(logits, labels, reduction)
