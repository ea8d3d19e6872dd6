"""Sequence parallelism (Korthikanti et al. 2022) as two autograd-aware collectives along dim 0.

Outside the tensor-parallel regions (norms, dropout, residuals) each TP rank keeps only its 1/tp
slice of the sequence. Entering a region all-gathers the sequence (its backward reduce-scatters the
partial gradients); leaving a row-parallel layer, whose output megatron has already all-reduced,
keeps this rank's slice (its backward all-gathers). megatron-core 0.16.1 ships equivalent mappings,
but they allocate their buffers with `torch.cuda.current_device()`, so they cannot run on CPU/gloo;
these allocate on the input's device and run on either backend.
"""
import torch
import torch.distributed as dist


def _all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // dist.get_world_size(group), *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def _my_slice_dim0(x: torch.Tensor, group) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group), dim=0)[dist.get_rank(group)].contiguous()


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
        return _my_slice_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim0(grad, ctx.group), None


def gather_sequence(x: torch.Tensor, tp_group) -> torch.Tensor:
    """[s/tp, b, h] -> [s, b, h]; gradients are summed over the TP group and re-split."""
    if dist.get_world_size(tp_group) == 1:
        return x
    return _GatherSequence.apply(x, tp_group)


def split_sequence(x: torch.Tensor, tp_group) -> torch.Tensor:
    """[s, b, h], identical on every TP rank -> this rank's [s/tp, b, h]."""
    if dist.get_world_size(tp_group) == 1:
        return x
    return _SplitSequence.apply(x, tp_group)
