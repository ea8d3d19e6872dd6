"""The tied embedding under a pipeline: the first stage looks tokens up in it and the last stage
scores with it, so each holds a copy (as in Megatron, whose embedding group this is). Both copies are
drawn from the same seed and name, so they start equal; summing their gradients over the embedding
group before every update keeps them equal, and the last stage's copy is left out of the global
gradient norm and of checkpoints, so the one matrix counts once."""
from __future__ import annotations

import torch.distributed as dist

from parallel.checkpoint import deepspeed_adapter as ds
from parallel.topology import Topology


def holds_tied_copy(model, topo: Topology) -> bool:
    """Whether `model` (this rank's stage) is a last stage holding a copy of the first stage's embedding."""
    return topo.pp > 1 and model.cfg.tied and topo.is_last_stage


def mark_tied_copy(model, topo: Topology) -> None:
    if holds_tied_copy(model, topo):
        ds.count_once_across_stages(model.embedding.weight)


def sum_tied_embedding_gradients(engine, topo: Topology) -> None:
    """Called after the last backward of a step and before the engine reduces over DP and updates."""
    model = engine.module
    if topo.pp > 1 and model.cfg.tied and (topo.is_first_stage or topo.is_last_stage):
        dist.all_reduce(ds.accumulated_gradient(model.embedding.weight), group=topo.embedding_group)
