"""What a rank holds of a parameter that ZeRO-3 partitioned: the one reader of DeepSpeed's partition
attributes (`ds_tensor`, `ds_shape`, `ds_numel`), which it does not document as an interface.
Building a model (parallel.engine.building_model) and checkpoints check first that DeepSpeed is the
release parallel/checkpoint/deepspeed_adapter.py pins.

Under `deepspeed.zero.Init` a parameter is partitioned as soon as its module is built: `param.data`
is left empty, and DP rank r keeps elements [r x n, (r + 1) x n) of the flattened TP-local tensor in
`param.ds_tensor` (n elements, the last rank's padded). Initialisation and `model.init_from` write
only that range (models/init.py, parallel/checkpoint).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_partitioned(param: torch.Tensor) -> bool:
    return getattr(param, "ds_tensor", None) is not None


def full_shape(param: torch.Tensor) -> torch.Size:
    """The TP-local shape of `param`, whether or not ZeRO-3 partitioned it."""
    return param.ds_shape if is_partitioned(param) else param.shape


def partition_numel(param: torch.Tensor) -> int:
    """The elements of each DP rank's partition of `param`, the last rank's padding included."""
    return param.ds_tensor.numel()


def held_values(param: torch.Tensor) -> tuple[torch.Size, int, torch.Tensor]:
    """(the TP-local shape of `param`, the flat offset of what this rank holds of it, those values as
    a flat view to write into): the whole tensor, or this DP rank's ZeRO-3 partition without its padding."""
    if not is_partitioned(param):
        return param.shape, 0, param.data.view(-1)
    n = partition_numel(param)
    start = n * dist.get_rank(param.ds_process_group)
    held = max(0, min(n, param.ds_numel - start))
    return param.ds_shape, min(start, param.ds_numel), param.ds_tensor.view(-1)[:held]
