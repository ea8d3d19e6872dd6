"""Model definitions built from megatron-core tensor-parallel layers; they know nothing of launchers or engines.

`build_model` picks the class that `model.arch` names; it imports megatron-core only when called,
so reading a config does not pay for it. Every model implements `LanguageModel`, the interface the
training loop, the evaluator and the planner use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn


class LanguageModel(Protocol):
    """What training asks of a model (models.gpt.GPT, models.t5.T5, models.bert.BERT): an nn.Module whose forward
    takes the keyword arguments `batch_inputs` makes of a batch."""

    def layers(self) -> list[nn.Module]:
        """The transformer layers this model holds, in order."""

    @staticmethod
    def batch_inputs(batch: Any) -> dict[str, torch.Tensor]:
        """A data-pipeline batch as forward's keyword arguments (input_ids, labels, ...)."""

    def forward(self, *, labels: torch.Tensor | None = None, reduction: str = "mean", **inputs: torch.Tensor) -> Any:
        """With labels: the training loss (mean, plus any router losses); with reduction="sum", the summed loss
        and the number of labels scored; with reduction="evaluate", those two and any figure the model counts
        beside them (BERT: masked tokens it gets right). Without: this TP rank's vocabulary slice of the logits."""

    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per token) over the whole model, every TP shard and expert counted once."""

    def moe_metrics(self) -> list[dict]:
        """Per MoE layer, from the last forward: tokens per expert, dropped fraction, router losses; [] if dense."""


def model_class(cfg) -> type[LanguageModel]:
    """The class `model.arch` names: models.gpt.GPT, models.t5.T5 or models.bert.BERT. Its static `batch_inputs` tells
    what a batch feeds the forward without building the model (an outside reference needs no more)."""
    if cfg.arch == "t5":
        from models.t5 import T5
        return T5
    if cfg.arch == "bert":
        from models.bert import BERT
        return BERT
    from models.gpt import GPT
    return GPT


def build_model(cfg, vocab_size: int, **options) -> LanguageModel:
    """A `model_class(cfg)` for `cfg` (a ModelConfig); options: sequence_parallel, activation_checkpointing,
    expert_parallel_size."""
    return model_class(cfg)(cfg, vocab_size, **options)
