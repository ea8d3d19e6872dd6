"""Bytes per GPU at the peak of a training step: model states, DeepSpeed's buffers, activations.

Model states follow the ZeRO paper's accounting (Rajbhandari et al. 2020) as DeepSpeed implements
it, checked against a real engine on CPU (tests/test_plan.py): parameters and gradients in the
training precision, Adam's two fp32 moments, and an fp32 master copy of the weights whenever the
parameters are 16-bit or a ZeRO optimizer owns the update (DeepSpeed's ZeRO optimizer clones its
fp32 partition even when training in fp32). ZeRO partitions optimizer states over the data-parallel
ranks from stage 1, gradients from stage 2, parameters at stage 3.

Activations are Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models"), which counts 16-bit activations and 1-byte dropout masks for a GPT block with a 4h MLP
and attention scores stored (no flash attention): a conservative figure.
"""
from __future__ import annotations

from dataclasses import dataclass

from launcher.config import RunConfig
from launcher.plan.count import ParameterCount

# DeepSpeed's default reduce_bucket_size (parallel/engine.py keeps it): from stage 1 the gradients
# are reduced through a contiguous bucket of this many elements, alive during backward.
REDUCE_BUCKET_ELEMENTS = 500_000_000
ZERO3_GATHERED_LAYERS = 2  # the block computing and the block prefetched

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Memory:
    parameters: float
    gradients: float
    optimizer: float
    buffers: float  # DeepSpeed's reduce bucket, and ZeRO-3's gathered layers
    activations: float

    @property
    def model_states(self) -> float:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.buffers + self.activations


def optimizer_bytes_per_parameter(precision: str, zero_stage: int) -> int:
    """Adam's moments (8 bytes), plus the fp32 master weights (4) unless plain fp32 without ZeRO."""
    master = 4 if precision != "fp32" or zero_stage >= 1 else 0
    return 8 + master


def memory_per_gpu(cfg: RunConfig, count: ParameterCount, dp: int, vocab_size: int) -> Memory:
    stage, precision = cfg.parallel.zero_stage, cfg.train.precision
    width = BYTES[precision]
    psi = count.per_rank
    buffers = REDUCE_BUCKET_ELEMENTS * width if stage >= 1 else 0
    if stage == 3:
        buffers += ZERO3_GATHERED_LAYERS * count.per_layer_per_rank * width
    return Memory(
        parameters=psi * width / (dp if stage >= 3 else 1),
        gradients=psi * width / (dp if stage >= 2 else 1),
        optimizer=psi * optimizer_bytes_per_parameter(precision, stage) / (dp if stage >= 1 else 1),
        buffers=buffers,
        activations=activation_bytes(cfg, vocab_size),
    )


def activation_bytes(cfg: RunConfig, vocab_size: int) -> float:
    """Activations one micro-batch keeps for backward (Korthikanti et al. 2022, section 4)."""
    m, p = cfg.model, cfg.parallel
    s, b, h, a, L, t = cfg.data.seq_len, cfg.train.micro_batch_size, m.hidden_size, m.num_heads, m.num_layers, p.tp
    v = m.padded_vocab_size(vocab_size)
    if p.sequence_parallel:  # every tensor of the block is split over TP, norms and dropout included
        one_layer = s * b * h / t * (34 + 5 * a * s / h)
    else:  # only the tensors inside the TP region are split; 10sbh are replicated
        one_layer = s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    if p.activation_checkpointing:
        # Each block's 16-bit input is kept; one block at a time is rebuilt in full during backward.
        kept = L * 2 * s * b * h / (t if p.sequence_parallel else 1) + one_layer
    else:
        kept = L * one_layer
    # Embedding dropout and final norm (4sbh/t) and the fp32 logits for the cross-entropy (4sbv/t).
    head = 4 * s * b * h / t * (1 + v / h)
    return (kept + head) * BYTES[cfg.train.precision] / 2
