"""Runs one rank's part of a pipeline schedule: forwards and backwards of micro-batches through the
model chunks this rank holds, under the DeepSpeed engine.

The engine is DeepSpeed's ordinary one, not its PipelineEngine (docs/pipeline.md says why), built
with `managed_gradient_accumulation: false`: every backward only accumulates gradients, and the one
`engine.step()` after the schedule is where ZeRO-1 reduces them over DP, clips by the global norm
and updates. Each backward goes through `engine.backward`, so the bf16 optimizer accumulates every
micro-batch's gradients in fp32 exactly as it does without a pipeline. The last stage's backward is
of the loss, which the engine divides by the micro-batch count; another stage's is of the surrogate
<output, gradient received> (+ router-loss sum x its gradient), whose gradient is the one received,
already divided, so it is not divided again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Protocol

import torch

from parallel.checkpoint import deepspeed_adapter as ds
from parallel.pipeline.p2p import StageLink
from parallel.pipeline.schedule import forward_only, one_f_one_b, virtual_stage
from parallel.pipeline.tied import sum_tied_embedding_gradients
from parallel.topology import Topology


class StageModel(Protocol):
    """What the pipeline asks of a model stage (models.gpt.GPT built with `layers`, `pre_process`,
    `post_process`): its forward cut where stages meet."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The first block's input (first stage)."""

    def run_layers(self, x: torch.Tensor, layers: Iterable[int]) -> torch.Tensor:
        """x through the blocks of these global layer indices, which this stage holds."""

    def router_loss(self, layers: Iterable[int]) -> torch.Tensor | float:
        """The MoE router losses of those blocks' last forward (0 for dense blocks)."""

    def head(self, x: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
        """The next-token loss of the last block's output (last stage): its mean, or its sum and tokens scored."""


@dataclass
class _InFlight:
    """A micro-batch's forward through one chunk, kept until its backward."""
    inputs: Optional[list[torch.Tensor]]  # received (hidden, router loss); None on the first virtual stage
    outputs: list[torch.Tensor]  # sent on (hidden, router loss), or on the last virtual stage [loss]


class Pipeline:
    """This rank's stage of a pipeline: `model` holds the blocks of its chunks (`chunks[c]`: the global
    layer indices of virtual stage c x pp + pp_rank), with the embedding on the first stage and the
    head on the last."""

    def __init__(self, engine, topo: Topology, chunks: list[range], micro_batches: int, hidden_shape: torch.Size,
                 dtype: torch.dtype):
        self.engine, self.topo, self.chunks = engine, topo, chunks
        self.model: StageModel = engine.module
        self.micro_batches = micro_batches  # per step; the stages between the ends are handed none
        self.last_stage = topo.pp * len(chunks) - 1
        self.payload = [(hidden_shape, dtype), (torch.Size([]), torch.float32)]

    def train_step(self, micro_batches: list[dict], loss_weight: None = None) -> torch.Tensor:
        """Forward and backward every micro-batch and take the optimizer step. Returns this rank's
        summed loss of the micro-batches: the real one on the last stage, 0 elsewhere. Pipelines hold decoders,
        whose micro-batches score alike: no loss_weight."""
        assert loss_weight is None, "a pipeline's micro-batches are scored by their mean loss"
        link = StageLink(self.topo, self.micro_batches, self.payload)
        loss_sum = torch.zeros((), device=self.topo.device)
        in_flight: dict[tuple[int, int], _InFlight] = {}
        for action in one_f_one_b(self.topo.pp, len(self.chunks), self.micro_batches, self.topo.pp_rank):
            key = (action.micro_batch, action.chunk)
            if action.kind == "forward":
                in_flight[key] = self._forward(link, micro_batches, *key)
                if self._stage(action.chunk) == self.last_stage:
                    loss_sum += in_flight[key].outputs[0].detach().float()
            else:
                self._backward(link, in_flight.pop(key), *key)
        link.finish()
        sum_tied_embedding_gradients(self.engine, self.topo)
        self.engine.step()
        return loss_sum

    @torch.no_grad()
    def evaluate(self, micro_batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed loss and the number of tokens scored of the micro-batches, on the last stage (0
        elsewhere); forwards only. Every stage is handed the validation batches (their number)."""
        link = StageLink(self.topo, len(micro_batches), self.payload)
        totals = torch.zeros(2, dtype=torch.float64, device=self.topo.device)
        for action in forward_only(self.topo.pp, len(self.chunks), len(micro_batches), self.topo.pp_rank):
            inputs = micro_batches[action.micro_batch]
            hidden, router_loss, _ = self._chunk(link, inputs, action.micro_batch, action.chunk, requires_grad=False)
            if self._stage(action.chunk) == self.last_stage:
                loss_sum, tokens = self.model.head(hidden, inputs["labels"], reduction="sum")
                totals += torch.stack([loss_sum.double(), tokens.double()])
            else:
                link.send_activations([hidden, router_loss], action.micro_batch, self._stage(action.chunk) + 1)
        link.finish()
        return totals[0], totals[1]

    def _stage(self, chunk: int) -> int:
        return virtual_stage(chunk, self.topo.pp_rank, self.topo.pp)

    def _chunk(self, link: StageLink, inputs: dict, micro_batch: int, chunk: int, requires_grad: bool):
        """The chunk's blocks on the micro-batch's hidden states: embedded here on the first virtual stage,
        else received. Returns (hidden, router-loss sum so far) and what was received."""
        stage = self._stage(chunk)
        if stage == 0:
            received, hidden = None, self.model.embed(inputs["input_ids"])
            router_loss = torch.zeros((), device=self.topo.device)
        else:
            received = link.receive_activations(micro_batch, stage)
            for tensor in received:
                tensor.requires_grad_(requires_grad)
            hidden, router_loss = received
        layers = self.chunks[chunk]
        hidden = self.model.run_layers(hidden, layers)
        return hidden, router_loss + self.model.router_loss(layers), received

    def _forward(self, link: StageLink, micro_batches: list[dict], micro_batch: int, chunk: int) -> _InFlight:
        inputs = micro_batches[micro_batch] if micro_batches else None  # none between the ends
        hidden, router_loss, received = self._chunk(link, inputs, micro_batch, chunk, requires_grad=True)
        stage = self._stage(chunk)
        if stage == self.last_stage:
            return _InFlight(received, [self.model.head(hidden, inputs["labels"]) + router_loss])
        link.send_activations([hidden, router_loss], micro_batch, stage + 1)
        return _InFlight(received, [hidden, router_loss])

    def _backward(self, link: StageLink, done: _InFlight, micro_batch: int, chunk: int) -> None:
        stage = self._stage(chunk)
        ds.start_micro_batch_backward(self.engine)
        if stage == self.last_stage:
            self.engine.backward(done.outputs[0])
        else:
            gradients = link.receive_gradients(micro_batch, stage)
            surrogate = sum((output * gradient).sum() for output, gradient in zip(done.outputs, gradients)
                            if output.requires_grad)
            self.engine.backward(surrogate, scale_wrt_gas=False)
        if done.inputs is not None:
            link.send_gradients([_grad_or_zeros(t) for t in done.inputs], micro_batch, stage - 1)


def _grad_or_zeros(tensor: torch.Tensor) -> torch.Tensor:
    """A received tensor's gradient: none when nothing downstream depended on it (a dense model's router-loss sum)."""
    return tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
