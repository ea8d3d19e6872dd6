"""Initialisation that costs each rank only what it keeps, with one model per seed at every layout.

Megatron's `use_cpu_initialization` draws every full weight matrix on every rank from one CPU
generator and keeps this rank's slice: layout-independent, but each rank pays for the whole model
(about a minute at 17B, eleven at 175B, and an MoE rank draws every expert to keep 1/ep of them).

Here a weight's values are a function of (seed, its name, the index along its TP partition
dimension). Each index along that dimension (a row of a column-parallel weight or of the
vocabulary, a column of a row-parallel weight, a head's column of T5's bias table) is drawn from a
generator of its own, seeded by a hash of the three; every legal TP split cuts between indices, so
a rank draws exactly its slice and the gathered weight is the same bits at any TP size. A
replicated tensor is drawn whole from (seed, name); an expert from (seed, the name it has at EP=1),
so a rank draws only its own experts and EP does not change them.

Megatron builds the layers (`parallel_layer`), allocating this rank's slice and drawing nothing;
`initialise` then draws every parameter marked by `draw_normal`. It draws on the CPU in fp32 and
copies into the parameter, whatever its device and dtype, so one seed is one model on a CPU and a
GPU, and in bf16 it is the fp32 model rounded. Where ZeRO-3 partitioned a parameter as it was built,
the rank draws only the slices its partition meets and writes only its partition.
"""
import hashlib
import math

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig

from parallel.zero3 import held_values

# The dimension megatron splits over TP: a column-parallel layer's output features (its weight's
# rows), a row-parallel layer's input features (columns), the embedding's vocabulary (rows).
_PARTITION_DIM = {
    tensor_parallel.ColumnParallelLinear: 0,
    tensor_parallel.RowParallelLinear: 1,
    tensor_parallel.VocabParallelEmbedding: 0,
}


def layer_config(tp: int) -> ModelParallelConfig:
    """Megatron allocates each rank's slice where and as torch allocates by default (the device and
    the dtype the model is built under: parallel.engine.building_model) and leaves the drawing to
    `initialise`."""
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=False, params_dtype=torch.get_default_dtype())


def parallel_layer(layer_class, *args, std: float, **kwargs):
    """A megatron TP layer whose weight `initialise` draws from N(0, std). Without
    perform_initialization megatron neither marks the weight as split nor zeroes the bias: the marks
    (tensor_model_parallel, partition_dim) are what gradient clipping, checkpoints and `initialise`
    read, so they are set here, with megatron's public setter."""
    layer = layer_class(*args, init_method=_drawn_later, **kwargs)
    tensor_parallel.set_tensor_model_parallel_attributes(layer.weight, True, _PARTITION_DIM[layer_class], 1)
    draw_normal(layer.weight, std)
    if getattr(layer, "bias", None) is not None:
        held_values(layer.bias)[2].zero_()  # ZeRO-3 may have partitioned it already
    return layer


def _drawn_later(weight):
    raise AssertionError("megatron drew a weight: build its layers with layer_config()")


def draw_normal(param: torch.nn.Parameter, std: float) -> torch.nn.Parameter:
    """Mark `param` to be drawn from N(0, std) by `initialise`."""
    param.init_std = std
    return param


@torch.no_grad()
def initialise(model: torch.nn.Module, seed: int) -> int:
    """Draw every parameter of `model` marked by `draw_normal`; returns the elements drawn. Meta
    tensors (`parallax plan`'s shape-only build) have nothing to draw."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    generator, drawn = torch.Generator("cpu"), 0
    for name, p in model.named_parameters():
        if not hasattr(p, "init_std") or p.is_meta:
            continue
        shape, start, held = held_values(p)
        if getattr(p, "tensor_model_parallel", False):
            dim, first = p.partition_dim, tp_rank * shape[p.partition_dim]
            slices = (math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:]))
            drawn += _fill(held, start, slices, lambda i: (seed, name, first + i), p.init_std, generator)
        else:
            key = (seed, _layout_free_name(name, p))
            drawn += _fill(held, start, (1, 1, math.prod(shape)), lambda i: key, p.init_std, generator)
    return drawn


_CPU_FP32 = {"dtype": torch.float32, "device": "cpu"}  # where slices are drawn, whatever the default
# A whole weight's slices are drawn into a host tile of about this many fp32 numbers (8 MiB), copied into the
# parameter at once. A copy per slice (a row of 4256 numbers, or a strided column) made initialisation on a GPU
# 1.3x slower than megatron's full matrices, and on the CPU the tile's one copy is 25% faster than those.
DRAW_TILE_ELEMENTS = 2**21


def _fill(held: torch.Tensor, start: int, slices: tuple[int, int, int], key, std: float,
          generator: torch.Generator) -> int:
    """Fill `held`, the flat range [start, start + numel) of a tensor viewed as (A, N, B) whose N
    slices [:, i, :] are each drawn whole, contiguously, from generator `key(i)`; returns the
    elements drawn.

    Slices are drawn on the CPU in fp32 and copied into the parameter's device and dtype, so one
    seed is one model on a CPU and a GPU, and a bf16 parameter holds exactly the rounded fp32
    values. A rank that holds the whole tensor draws a tile of slices at a time and copies each tile
    once; one that holds only part of it (a ZeRO-3 partition) draws only the slices that part meets,
    one at a time, into a tile of the part's rows."""
    a_size, n_slices, b_size = slices
    if held.numel() == 0:
        return 0
    if start == 0 and held.numel() == a_size * n_slices * b_size:
        _fill_whole(held.view(a_size, n_slices, b_size), key, std, generator)
        return held.numel()
    return _fill_part(held, start, slices, key, std, generator)


def _fill_whole(held: torch.Tensor, key, std: float, generator: torch.Generator) -> None:
    a_size, n_slices, b_size = held.shape
    per_tile = max(1, DRAW_TILE_ELEMENTS // (a_size * b_size))
    tile = torch.empty(min(per_tile, n_slices), a_size, b_size, **_CPU_FP32)  # slice-major: each draw is contiguous
    for first in range(0, n_slices, per_tile):
        drawn = tile[:min(per_tile, n_slices - first)]
        for i, slice_ in enumerate(drawn):
            _draw(slice_, std, key(first + i), generator)
        held[:, first:first + len(drawn)].copy_(drawn.transpose(0, 1))


def _fill_part(held: torch.Tensor, start: int, slices: tuple[int, int, int], key, std: float,
               generator: torch.Generator) -> int:
    a_size, n_slices, b_size = slices
    row = n_slices * b_size  # one index along A: every slice's part of it
    end = start + held.numel()
    first_row, last_row = start // row, (end - 1) // row
    if first_row == last_row:  # within one row: only the slices that row's part meets
        first, last = (start - first_row * row) // b_size, (end - 1 - first_row * row) // b_size
    else:
        first, last = 0, n_slices - 1
    tile = torch.empty(last_row - first_row + 1, last - first + 1, b_size, **_CPU_FP32)
    buffer = torch.empty(a_size * b_size, **_CPU_FP32)
    for i in range(first, last + 1):
        _draw(buffer, std, key(i), generator)
        tile[:, i - first, :].copy_(buffer.view(a_size, b_size)[first_row:last_row + 1])
    offset = start - (first_row * row + first * b_size)
    held.copy_(tile.flatten()[offset:offset + held.numel()])
    return (last - first + 1) * buffer.numel()


def _draw(tensor: torch.Tensor, std: float, key: tuple, generator: torch.Generator) -> None:
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    generator.manual_seed(int.from_bytes(digest, "little") >> 1)  # manual_seed takes a signed 64-bit seed
    tensor.normal_(0.0, std, generator=generator)


def _layout_free_name(name: str, p: torch.nn.Parameter) -> str:
    """The name `p` has at EP=1: an expert's module name holds its index among this rank's experts
    (`models.moe` records it with the global one), every other name is the same at any layout."""
    if not hasattr(p, "expert_index"):
        return name
    local, global_ = p.expert_index
    return name.replace(f".deepspeed_experts.{local}.", f".deepspeed_experts.{global_}.")
