"""How many parameters one rank holds: the model built on the meta device, and the closed form.

The meta build is the real `models.gpt.GPT` for rank 0 of the layout's tensor-parallel group, so it
counts exactly what a training rank allocates, without allocating it. Megatron's layers ask
`parallel_state` for the TP group, so the build runs inside a world of fake ranks (torch's "fake"
backend: groups of any size in one process, no communication). Only the model-parallel ranks are
faked: a data-parallel replica holds the same shard, and creating every group of a thousands-GPU
world costs seconds and tells nothing more. Megatron's `use_cpu_initialization` draws each full
weight and copies this rank's slice; under `torch.device("meta")` both are shape-only.

The closed form is the same architecture written down by hand; the plan refuses to go on if the two
disagree, and the search (which plans many TP sizes) uses it for the sizes it does not build.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from models.config import ModelConfig


@dataclass(frozen=True)
class ParameterCount:
    per_rank: int  # what one GPU holds before ZeRO partitions it
    total: int  # the model, every TP shard counted once
    per_layer_per_rank: int  # one block's share: what ZeRO-3 gathers at a time

    def __str__(self) -> str:
        return f"{self.total / 1e9:.2f}B parameters, {self.per_rank / 1e9:.2f}B per GPU"


def closed_form_count(m: ModelConfig, vocab_size: int, tp: int) -> ParameterCount:
    """Parameters of models.gpt.GPT: which tensors are split over TP and which every rank replicates."""
    h, f, L = m.hidden_size, m.ffn_size, m.num_layers
    norm = 2 * h if m.norm == "layernorm" else h
    # Column-parallel QKV and fc_in (weight and bias) and row-parallel proj and fc_out weights are split.
    layer_split = (3 * h * h + 3 * h) + h * h + (h * f + f) + f * h
    # Row-parallel biases (added after the all-reduce) and both norms are replicated.
    layer_replicated = 2 * h + 2 * norm
    embedding = m.padded_vocab_size(vocab_size) * h  # vocabulary-parallel, tied to the output layer
    replicated = (m.max_seq_len * h if m.position_embedding == "learned" else 0) + norm  # + final norm
    per_layer_per_rank = layer_split // tp + layer_replicated
    return ParameterCount(
        per_rank=L * per_layer_per_rank + embedding // tp + replicated,
        total=L * (layer_split + layer_replicated) + embedding + replicated,
        per_layer_per_rank=per_layer_per_rank,
    )


def built_count(m: ModelConfig, vocab_size: int, tp: int) -> ParameterCount:
    """Build rank 0 of a TP=`tp` layout on the meta device and count what it holds."""
    import torch

    from models.gpt import GPT

    with _fake_model_parallel_world(tp), torch.device("meta"):
        model = GPT(m, vocab_size)
    per_rank = sum(p.numel() for p in model.parameters())
    total = sum(p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1) for p in model.parameters())
    per_layer = sum(p.numel() for p in model.blocks[0].parameters())
    return ParameterCount(per_rank=per_rank, total=total, per_layer_per_rank=per_layer)


def checked_count(m: ModelConfig, vocab_size: int, tp: int) -> ParameterCount:
    built = built_count(m, vocab_size, tp)
    expected = closed_form_count(m, vocab_size, tp)
    if built != expected:
        raise RuntimeError(f"the meta-built model ({built}) disagrees with the closed form ({expected})")
    return built


@contextmanager
def _fake_model_parallel_world(tp: int):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("planning builds its own fake process group; run it outside a distributed job")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, create_gloo_process_groups=False)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
