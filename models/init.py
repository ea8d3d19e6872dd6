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
`initialise` then draws every parameter marked by `draw_normal`, on the parameter's device. The CPU
and CUDA generators are different streams: one seed is one model per device type.
"""
import hashlib

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig

# The dimension megatron splits over TP: a column-parallel layer's output features (its weight's
# rows), a row-parallel layer's input features (columns), the embedding's vocabulary (rows).
_PARTITION_DIM = {
    tensor_parallel.ColumnParallelLinear: 0,
    tensor_parallel.RowParallelLinear: 1,
    tensor_parallel.VocabParallelEmbedding: 0,
}


def layer_config(tp: int) -> ModelParallelConfig:
    """Megatron allocates each rank's slice where torch allocates by default (the CPU, or the device
    the model is built under) and leaves the drawing to `initialise`."""
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=False)


def parallel_layer(layer_class, *args, std: float, **kwargs):
    """A megatron TP layer whose weight `initialise` draws from N(0, std). Without
    perform_initialization megatron neither marks the weight as split nor zeroes the bias: the marks
    (tensor_model_parallel, partition_dim) are what gradient clipping, checkpoints and `initialise`
    read, so they are set here, with megatron's public setter."""
    layer = layer_class(*args, init_method=_drawn_later, **kwargs)
    tensor_parallel.set_tensor_model_parallel_attributes(layer.weight, True, _PARTITION_DIM[layer_class], 1)
    draw_normal(layer.weight, std)
    if getattr(layer, "bias", None) is not None:
        layer.bias.data.zero_()
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
    generators, drawn = {}, 0
    for name, p in model.named_parameters():
        if not hasattr(p, "init_std") or p.is_meta:
            continue
        generator = generators.setdefault(p.device, torch.Generator(p.device))
        if getattr(p, "tensor_model_parallel", False):
            _draw_slices(p, (seed, name), tp_rank * p.shape[p.partition_dim], generator)
        else:
            _draw(p, p.init_std, (seed, _layout_free_name(name, p)), generator)
        drawn += p.numel()
    return drawn


def _draw_slices(p: torch.nn.Parameter, key: tuple, first: int, generator: torch.Generator) -> None:
    """Index i of p's partition dimension is global index first + i. A slice is always drawn
    contiguously (a strided draw is a different stream): in place when it is a row, else into a
    one-slice buffer copied into its column, so the rank never holds more than its weights."""
    dim = p.partition_dim
    buffer = torch.empty_like(p.data.select(dim, 0), memory_format=torch.contiguous_format)
    for i in range(p.shape[dim]):
        part = p.data.select(dim, i)
        target = part if part.is_contiguous() else buffer
        _draw(target, p.init_std, (*key, first + i), generator)
        if target is buffer:
            part.copy_(buffer)


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
