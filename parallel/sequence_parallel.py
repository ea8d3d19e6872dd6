"""Sequence parallelism (Korthikanti et al. 2022): the collectives that move between a sequence
split over the tensor-parallel group and a whole one, along dim 0 of [s, b, h] activations.

Outside the tensor-parallel regions (norms, dropout, residuals) each TP rank keeps only its 1/tp
slice of the sequence. Entering a region all-gathers the sequence (its backward reduce-scatters
the partial gradients). Leaving it, the row-parallel layer's partial sums are reduce-scattered, so
each rank keeps its slice of the sum (its backward all-gathers). An all-reduce is a reduce-scatter
followed by an all-gather, so this moves exactly the bytes plain tensor parallelism moves.

A parameter that every TP rank holds whole but applies to its own slice of the sequence (norm
gains, row-parallel biases, position embeddings) gets a partial gradient on each rank;
`replicated_parameter` sums it over the group in the autograd graph itself (megatron's
copy-to-tensor-parallel-region), so it is right under any engine or ZeRO stage.

megatron-core 0.16.1 ships equivalent mappings, but they allocate their buffers with
`torch.cuda.current_device()`, so they cannot run on CPU/gloo; these allocate on the input's device
and run on either backend.
"""
import torch
import torch.distributed as dist
from megatron.core import tensor_parallel


def _all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // dist.get_world_size(group), *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_dim0(grad, ctx.group), None


class _SplitSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.chunk(dist.get_world_size(group), dim=0)[dist.get_rank(group)].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim0(grad, ctx.group), None


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim0(grad, ctx.group), None


def gather_sequence(x: torch.Tensor, tp_group) -> torch.Tensor:
    """[s/tp, b, h] -> [s, b, h]; gradients are summed over the TP group and re-split."""
    if dist.get_world_size(tp_group) == 1:
        return x
    return _GatherSequence.apply(x, tp_group)


def reduce_scatter_sequence(x: torch.Tensor, tp_group) -> torch.Tensor:
    """[s, b, h] partial sums on every TP rank -> this rank's [s/tp, b, h] of their sum."""
    if dist.get_world_size(tp_group) == 1:
        return x
    return _ReduceScatterSequence.apply(x, tp_group)


def split_sequence(x: torch.Tensor, tp_group) -> torch.Tensor:
    """[s, b, h], identical on every TP rank -> this rank's [s/tp, b, h]; the backward all-gathers.
    For outputs that are already whole on every rank (the MoE layer's, whose experts are replicated over TP)."""
    if dist.get_world_size(tp_group) == 1:
        return x
    return _SplitSequence.apply(x, tp_group)


def replicated_parameter(p: torch.Tensor) -> torch.Tensor:
    """`p` for use on this rank's slice of the sequence: its gradient is summed over the TP group."""
    return tensor_parallel.copy_to_tensor_model_parallel_region(p)


def row_parallel_reduce_scatter(layer: tensor_parallel.RowParallelLinear, x: torch.Tensor, tp_group) -> torch.Tensor:
    """What megatron's row-parallel `layer` computes, with its partial outputs reduce-scattered
    along the sequence instead of all-reduced: [s, b, in/tp] -> this rank's [s/tp, b, out]."""
    out = reduce_scatter_sequence(torch.nn.functional.linear(x, layer.weight), tp_group)
    return out if layer.bias is None else out + replicated_parameter(layer.bias)


def vocab_parallel_embedding_partial(embedding: tensor_parallel.VocabParallelEmbedding,
                                     input_ids: torch.Tensor) -> torch.Tensor:
    """This rank's share of megatron's vocabulary-parallel lookup, before its all-reduce: the rows of
    the tokens in this rank's vocabulary slice, zero for the others. Summed over TP, it is the lookup."""
    outside = (input_ids < embedding.vocab_start_index) | (input_ids >= embedding.vocab_end_index)
    local_ids = (input_ids - embedding.vocab_start_index).masked_fill(outside, 0)
    return torch.nn.functional.embedding(local_ids, embedding.weight).masked_fill(outside.unsqueeze(-1), 0.0)
