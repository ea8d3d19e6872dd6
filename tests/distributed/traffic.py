"""Bytes each rank sends in collectives, counted from the real c10d calls as they are dispatched.

A TorchDispatchMode sees every c10d op with its tensors (and lets it run unchanged), forward and
backward alike. Each op's bytes are what one rank sends with a bandwidth-optimal (ring)
implementation on p ranks, the count Korthikanti et al. use: an all-reduce of n bytes sends
2(p-1)/p x n, an all-gather (n bytes gathered) and a reduce-scatter (n bytes scattered) each
(p-1)/p x n. gloo's own wire traffic differs (it implements reduce-scatter as an all-reduce), NCCL's
ring matches these counts.
"""
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def ring_all_reduce_bytes(nbytes: int, p: int) -> float:
    return 2 * (p - 1) / p * nbytes


def _ring_bytes(op: str, tensors: list[torch.Tensor], p: int) -> float:
    def nbytes(t):
        return t.numel() * t.element_size()

    if op == "allreduce_":
        return ring_all_reduce_bytes(sum(map(nbytes, tensors)), p)
    if op in ("_allgather_base_", "_reduce_scatter_base_"):  # (output, input): the larger is the whole
        return (p - 1) / p * max(map(nbytes, tensors))
    if op == "barrier":
        return 0.0
    raise AssertionError(f"no byte count for c10d.{op}")


class CollectiveBytes(TorchDispatchMode):
    """`with CollectiveBytes(p) as sent: ...`, then `sent.bytes`; every collective must be over p ranks."""

    def __init__(self, group_size: int):
        super().__init__()
        self.group_size, self.bytes, self.ops = group_size, 0.0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            flat = tree_flatten((args, kwargs))[0]
            tensors = [a for a in flat if isinstance(a, torch.Tensor)]
            groups = [a for a in flat if isinstance(a, dist.ProcessGroup)]
            assert all(g.size() == self.group_size for g in groups), f"{func}: a group of another size"
            op = func._schema.name.split("::")[1]
            self.ops.append(op)
            self.bytes += _ring_bytes(op, tensors, self.group_size)
        return func(*args, **(kwargs or {}))
