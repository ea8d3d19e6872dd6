"""Point-to-point messages between neighbouring pipeline stages.

Virtual stage s lives on pipeline rank s mod pp, so activations always go to the next rank of the
pipeline ring and gradients to the previous one (the last rank's next is the first, which holds the
following chunk under interleaving). What crosses a stage boundary is a `payload`: the hidden states
[s, b, h] (this TP rank's [s/tp, b, h] under sequence parallelism; each TP rank sends to its peer at
the same TP position) and the running sum of the MoE router losses, which the last stage adds to the
language-model loss, so that router losses of every stage reach the objective and the logged loss.

Sends never wait: each is started and kept until the step ends, and a rank waits only for what it
receives. Each message has a tag of its own (kind, micro-batch, virtual stage, tensor), so gloo
matches it whatever order two ranks reach their sends and receives in. NCCL ignores tags and matches
a pair's messages in the order each end posts them: every rank runs its forwards (and its backwards)
in the same order of (micro-batch, chunk), so one kind of message between two ranks is posted in the
same order at both ends, and gradients travel on a group of their own (Topology.pp_gradient_group).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

ACTIVATION, GRADIENT = 0, 1


class StageLink:
    def __init__(self, topo, micro_batches: int, payload: list[tuple[torch.Size, torch.dtype]]):
        from megatron.core import parallel_state

        self.micro_batches, self.payload, self.device = micro_batches, payload, topo.device
        self.groups = {ACTIVATION: topo.pp_group, GRADIENT: topo.pp_gradient_group}
        self.next_rank = parallel_state.get_pipeline_model_parallel_next_rank()
        self.prev_rank = parallel_state.get_pipeline_model_parallel_prev_rank()
        self.in_flight: list[tuple[dist.Work, torch.Tensor]] = []

    def send_activations(self, tensors: list[torch.Tensor], micro_batch: int, to_stage: int) -> None:
        self._send(tensors, ACTIVATION, micro_batch, to_stage, self.next_rank)

    def send_gradients(self, tensors: list[torch.Tensor], micro_batch: int, to_stage: int) -> None:
        self._send(tensors, GRADIENT, micro_batch, to_stage, self.prev_rank)

    def receive_activations(self, micro_batch: int, stage: int) -> list[torch.Tensor]:
        """What virtual stage `stage` (on this rank) receives for the micro-batch; a tag names the receiving stage."""
        return self._receive(ACTIVATION, micro_batch, stage, self.prev_rank)

    def receive_gradients(self, micro_batch: int, stage: int) -> list[torch.Tensor]:
        return self._receive(GRADIENT, micro_batch, stage, self.next_rank)

    def finish(self) -> None:
        """Wait for every send started: their tensors may be freed, and the next step reuses the tags."""
        for work, _ in self.in_flight:
            work.wait()
        self.in_flight = []

    def _tag(self, kind: int, micro_batch: int, stage: int, index: int) -> int:
        return ((stage * self.micro_batches + micro_batch) * 2 + kind) * len(self.payload) + index

    def _send(self, tensors, kind, micro_batch, to_stage, peer) -> None:
        for index, tensor in enumerate(tensors):
            tensor = tensor.detach().contiguous()
            tag = self._tag(kind, micro_batch, to_stage, index)
            work = dist.isend(tensor, dst=peer, group=self.groups[kind], tag=tag)
            self.in_flight.append((work, tensor))

    def _receive(self, kind, micro_batch, stage, peer) -> list[torch.Tensor]:
        tensors = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in self.payload]
        works = [dist.irecv(tensor, src=peer, group=self.groups[kind], tag=self._tag(kind, micro_batch, stage, index))
                 for index, tensor in enumerate(tensors)]
        for work in works:
            work.wait()
        return tensors
