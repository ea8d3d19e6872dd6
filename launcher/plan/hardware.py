"""The GPUs and clusters a plan can target, with the figures its arithmetic needs.

These are assumptions the plan prints, not measurements: peaks are the vendors' dense tensor-core
figures (no sparsity), bandwidths are per-GPU line rates of a DGX-class node (NVLink/NVSwitch
inside a node, the node's InfiniBand shared by its GPUs between nodes).
"""
from __future__ import annotations

from dataclasses import dataclass

# launcher.config (ConfigError) is imported where a figure is refused, not here: the CLI's --help
# lists GPUS, and importing the config imports torch.

GiB = 2**30
TERA = 1e12

# Allocator fragmentation, the CUDA context and NCCL's own buffers take memory no formula here
# counts; a plan that needs more than this fraction of the card is not a plan.
USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    peak_tflops: dict[str, float]  # dense, by train.precision
    intra_node_gbs: float  # GB/s one GPU sends over NVLink
    inter_node_gbs: float  # GB/s one GPU sends over the network


# fp32 is IEEE fp32 on the CUDA cores: Parallax leaves TF32 off (torch's default for matmuls), so an
# fp32 run computes what the same run computes on a CPU, and its MFU is against this peak.
_HOPPER_PEAK = {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}
_AMPERE_PEAK = {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}

GPUS = {
    # DGX-2: 16 GPUs on NVSwitch, 8 x 100 Gb/s EDR per node.
    "v100": GPU("V100-32GB", 32, {"fp16": 125.0, "fp32": 15.7}, 150.0, 6.25),
    # DGX A100: 8 x 200 Gb/s HDR per node, one NIC per GPU.
    "a100-40gb": GPU("A100-40GB", 40, _AMPERE_PEAK, 300.0, 25.0),
    "a100": GPU("A100-80GB", 80, _AMPERE_PEAK, 300.0, 25.0),
    # DGX H100/H200: 8 x 400 Gb/s NDR per node, one NIC per GPU.
    "h100": GPU("H100-80GB", 80, _HOPPER_PEAK, 450.0, 50.0),
    "h200": GPU("H200-141GB", 141, _HOPPER_PEAK, 450.0, 50.0),
}


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: GPU

    @classmethod
    def of(cls, nodes: int, gpus_per_node: int, gpu: str) -> Cluster:
        from launcher.config import ConfigError

        if nodes < 1 or gpus_per_node < 1:
            raise ConfigError(f"--nodes={nodes} --gpus-per-node={gpus_per_node}: both must be 1 or more")
        if gpu not in GPUS:
            raise ConfigError(f"--gpu {gpu} is not known; choose one of {', '.join(GPUS)}")
        return cls(nodes, gpus_per_node, GPUS[gpu])

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_bytes(self) -> float:
        return self.gpu.memory_gib * GiB * USABLE_FRACTION

    def peak_flops(self, precision: str) -> float:
        if precision not in self.gpu.peak_tflops:
            from launcher.config import ConfigError

            usable = " or ".join(self.gpu.peak_tflops)
            raise ConfigError(f"train.precision={precision} is not supported on {self.gpu.name}; use {usable}")
        return self.gpu.peak_tflops[precision] * TERA

    def describe(self) -> str:
        return f"{self.nodes} x {self.gpus_per_node} {self.gpu.name} ({self.world_size} GPUs)"
