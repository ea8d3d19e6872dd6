"""FLOPs, communication and time of one optimizer step.

Model FLOPs are Megatron's count (Narayanan et al. 2021, appendix): every matrix multiply at 2 FLOPs
per multiply-add, attention scores included, backward twice the forward; per sequence that is
72 L s h^2 (1 + s/(6h) + V/(12 L h)) for a 4h MLP. Full activation recomputation runs each block's
forward again (their 96 L s h^2 (1 + s/(6h) + V/(16 L h))): the GPU does that work, but MFU counts
only the model's FLOPs.

Time is compute at an assumed fraction of the GPU's peak plus communication at line rate, with no
overlap: TP's collectives sit on the critical path by construction, and parallel/engine.py leaves
DeepSpeed's overlap_comm at its default (off for stages 1-2). It is an estimate to rank layouts and
catch hopeless ones, not a promise.
"""
from __future__ import annotations

from dataclasses import dataclass

from launcher.config import RunConfig
from launcher.plan.count import ParameterCount
from launcher.plan.hardware import Cluster
from launcher.plan.memory import BYTES

DEFAULT_EFFICIENCY = 0.5  # Megatron-LM reports 44-52% of A100 peak for GPT-3-scale runs


@dataclass(frozen=True)
class Step:
    model_flops: float
    hardware_flops: float
    compute_seconds: float
    tp_bytes: float  # sent by one GPU per step
    tp_seconds: float
    dp_bytes: float
    dp_seconds: float
    peak_flops: float  # of the whole cluster
    efficiency: float  # the assumed fraction of peak the compute reaches
    tokens: int

    @property
    def seconds(self) -> float:
        return self.compute_seconds + self.tp_seconds + self.dp_seconds

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.seconds * self.peak_flops)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def forward_flops_per_sequence(cfg: RunConfig, vocab_size: int) -> tuple[float, float]:
    """(all blocks, output layer) forward FLOPs for one sequence."""
    m, s = cfg.model, cfg.data.seq_len
    h, f = m.hidden_size, m.ffn_size
    block = 2 * s * (4 * h * h + 2 * h * f) + 4 * s * s * h  # QKV, proj, MLP; QK^T and attention x V
    return m.num_layers * block, 2 * s * h * m.padded_vocab_size(vocab_size)


def tp_bytes_per_step(cfg: RunConfig) -> float:
    """Each block all-reduces its [s, b, h] output twice forward and twice backward (the Megatron f/g
    pair per sub-layer), twice more when recomputed; the embedding and the logits' input add one each.
    Sequence parallelism swaps each all-reduce for a reduce-scatter plus an all-gather: same volume."""
    t, p = cfg.parallel.tp, cfg.parallel
    if t == 1:
        return 0.0
    per_block = 6 if p.activation_checkpointing else 4
    collectives = cfg.model.num_layers * per_block + 2
    message = cfg.data.seq_len * cfg.train.micro_batch_size * cfg.model.hidden_size * BYTES[cfg.train.precision]
    ring_all_reduce = 2 * (t - 1) / t * message
    return cfg.train.grad_accum * collectives * ring_all_reduce


DP_COLLECTIVES = {
    0: "gradient all-reduce",
    1: "gradient reduce-scatter + parameter all-gather",
    2: "gradient reduce-scatter per micro-batch + parameter all-gather",
    3: "parameter all-gathers (forward, backward) + gradient reduce-scatter per micro-batch",
}


def dp_bytes_per_step(cfg: RunConfig, count: ParameterCount, dp: int) -> float:
    """The ZeRO paper's volumes: stages 0-2 move 2 x parameters per step (all-reduce, or
    reduce-scatter + all-gather), stage 3 1.5x that. Stages 2-3 cannot keep whole gradients, so they
    reduce every micro-batch; stage 3 also gathers the parameters for each forward and backward."""
    if dp == 1:
        return 0.0
    ring = (dp - 1) / dp * count.per_rank * BYTES[cfg.train.precision]
    accum, stage = cfg.train.grad_accum, cfg.parallel.zero_stage
    if stage <= 1:
        return 2 * ring
    if stage == 2:
        return accum * ring + ring
    return 3 * accum * ring


def step_estimate(cfg: RunConfig, cluster: Cluster, count: ParameterCount, dp: int, vocab_size: int,
                  efficiency: float = DEFAULT_EFFICIENCY) -> Step:
    sequences = cfg.train.micro_batch_size * cfg.train.grad_accum * dp
    blocks, output = forward_flops_per_sequence(cfg, vocab_size)
    model_flops = 3 * sequences * (blocks + output)
    hardware_flops = model_flops + (sequences * blocks if cfg.parallel.activation_checkpointing else 0)
    peak = cluster.peak_flops(cfg.train.precision) * cluster.world_size
    tp_bytes, dp_bytes = tp_bytes_per_step(cfg), dp_bytes_per_step(cfg, count, dp)
    gpu = cluster.gpu
    # TP peers are adjacent ranks, on one node while tp <= gpus_per_node; DP spans nodes when there are several.
    tp_gbs = gpu.intra_node_gbs if cfg.parallel.tp <= cluster.gpus_per_node else gpu.inter_node_gbs
    dp_gbs = gpu.inter_node_gbs if cluster.nodes > 1 else gpu.intra_node_gbs
    return Step(
        model_flops=model_flops,
        hardware_flops=hardware_flops,
        compute_seconds=hardware_flops / (peak * efficiency),
        tp_bytes=tp_bytes,
        tp_seconds=tp_bytes / (tp_gbs * 1e9),
        dp_bytes=dp_bytes,
        dp_seconds=dp_bytes / (dp_gbs * 1e9),
        peak_flops=peak,
        efficiency=efficiency,
        tokens=sequences * cfg.data.seq_len,
    )
