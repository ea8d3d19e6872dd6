"""How a rank runs the micro-batches of an optimizer step: through the whole model, or through its
stage of a pipeline (runner.py, under schedule.py's 1F1B or interleaved 1F1B). The training loop and
the evaluator call either through `StepRunner`, and do not know which they have."""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from launcher.config import RunConfig
    from parallel.topology import Topology


class StepRunner(Protocol):
    engine: object  # the DeepSpeed engine, whose module is this rank's model (or stage of it)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]],
                   loss_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Forward and backward every micro-batch (the model's keyword arguments, on the device) and take
        the optimizer step; returns the summed loss of the micro-batches this rank scored (0 if none).
        loss_weight: each micro-batch's loss is its summed loss times this (launcher.train.per_token_loss),
        not its mean."""

    def evaluate(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        """The summed loss and number of tokens scored of the micro-batches this rank scored (0, 0 if none),
        then any figure the model counts beside them (BERT: masked tokens it got right)."""


class WholeModel:
    """No pipeline: each micro-batch forward and backward through the engine, which accumulates gradients
    and updates at the last one."""

    def __init__(self, engine, device: torch.device):
        self.engine, self.device = engine, device

    def train_step(self, micro_batches: list[dict], loss_weight: torch.Tensor | None = None) -> torch.Tensor:
        loss_sum = torch.zeros((), device=self.device)
        for inputs in micro_batches:
            if loss_weight is None:
                loss = self.engine(**inputs)
            else:
                loss = self.engine(**inputs, reduction="sum")[0] * loss_weight
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.detach().float()
        return loss_sum

    def evaluate(self, micro_batches: list[dict]) -> tuple[torch.Tensor, ...]:
        # the summed loss, the tokens scored, and any figure the model counts beside them (an encoder's right answers)
        figures = [torch.stack([figure.double() for figure in self.engine(**inputs, reduction="evaluate")])
                   for inputs in micro_batches]
        return tuple(torch.stack(figures).sum(0) if figures else torch.zeros(2, dtype=torch.float64, device=self.device))


def stage_chunks(cfg: RunConfig, pp_rank: int) -> list[range]:
    """The global layers of each model chunk pipeline rank `pp_rank` holds: virtual stages pp_rank, pp_rank + pp, ..."""
    stages, pp = cfg.stage_layers(), cfg.parallel.pp
    return [stages[chunk * pp + pp_rank] for chunk in range(cfg.parallel.virtual_stages)]


def stage_options(cfg: RunConfig, topo: Topology) -> dict:
    """build_model's options for this rank's stage: which blocks, and whether it embeds or scores."""
    if topo.pp == 1:
        return {}
    return {"layers": [layer for chunk in stage_chunks(cfg, topo.pp_rank) for layer in chunk],
            "pre_process": topo.is_first_stage, "post_process": topo.is_last_stage}


def whole_model_parameter_counts(model, topo: Topology) -> tuple[int, int]:
    """(total, active per token) of the whole model, from any stage's rank: each stage counts its own
    parameters (the last stage's copy of a tied embedding not again) and the stages add them up."""
    total, active = model.parameter_counts()
    if topo.pp == 1:
        return total, active
    from parallel.pipeline.tied import holds_tied_copy

    if holds_tied_copy(model, topo):
        copy = model.embedding.weight.numel() * topo.tp
        total, active = total - copy, active - copy
    counts = torch.tensor([total, active], dtype=torch.float64, device=topo.device)
    torch.distributed.all_reduce(counts, group=topo.pp_group)
    return int(counts[0]), int(counts[1])


def moe_metrics_of_every_stage(model, topo: Topology) -> list[dict]:
    """The MoE layers' figures of the last forward (LanguageModel.moe_metrics) of every stage of this rank's
    pipeline, in layer order. A collective over the whole world at a pipeline: every rank calls it."""
    metrics = model.moe_metrics()
    if topo.pp == 1 or model.cfg.moe is None:
        return metrics
    gathered = [None] * topo.world_size  # Python objects: the control plane's gloo group (parallel/topology.py)
    torch.distributed.all_gather_object(gathered, metrics, group=topo.control_group)
    stages = torch.distributed.get_process_group_ranks(topo.pp_group)
    return sorted((layer for rank in stages for layer in gathered[rank]), key=lambda layer: layer["layer"])


def step_runner(engine, cfg: RunConfig, topo: Topology) -> StepRunner:
    if topo.pp == 1:
        return WholeModel(engine, topo.device)
    from parallel.engine import PARAMS_DTYPE
    from parallel.pipeline.runner import Pipeline

    seq_len = cfg.data.seq_len // (topo.tp if cfg.parallel.sequence_parallel else 1)
    hidden = torch.Size([seq_len, cfg.train.micro_batch_size, cfg.model.hidden_size])
    return Pipeline(engine, topo, stage_chunks(cfg, topo.pp_rank), cfg.train.grad_accum, hidden,
                    PARAMS_DTYPE[cfg.train.precision])
