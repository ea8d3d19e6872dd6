"""Process-group topology: which TP, EP, DP and PP groups this rank belongs to.

The TP and DP groups are megatron-core's `parallel_state`, so its tensor-parallel layers find them
without being told; the expert groups are DeepSpeed's, because its MoE layer and engine look them
up by name. This module is the one place that creates both, and `Topology` is the one object the
rest of Parallax asks about ranks and groups. Rank order is Megatron's: tensor-parallel peers are
adjacent ranks (on one node, where their frequent all-reduces are cheap) and data-parallel ranks
are strided by tp. Each expert-parallel group is carved out of one data-parallel group (ep
consecutive DP ranks), so tokens travel to experts only between DP ranks; the expert-data-parallel
group, over which expert gradients are reduced, is the DP ranks at the same EP position. Experts
are replicated over TP peers and compute identical gradients there, so no reduction crosses TP
and DeepSpeed's TP-aware gradient norm counts them once. With tp=2, ep=2 on 4 ranks:
TP {0,1} {2,3}; DP {0,2} {1,3}; EP {0,2} {1,3}; expert-DP {0} {1} {2} {3}.

Pipeline stages are the slowest dimension, as in Megatron: stage s is ranks [s x W/pp, (s+1) x W/pp),
so TP and DP sit inside a stage (on one node when it fits) and only activations cross between
stages. The embedding group joins each first-stage rank to the last-stage rank at the same TP and DP
position: a tied embedding has a copy on both, whose gradients it sums.

Two planes. The groups above are the data plane: on GPUs they are NCCL, which moves device tensors
and refuses CPU tensors and pickled objects. Everything else (the stop vote, barriers, gathers of
Python objects such as checkpoint reports and loader states) goes over `control_group`, one gloo
group of the whole world, on CPU tensors. A checkpoint written in the background
(parallel/checkpoint/manager.py) has `save_group`, a second such group, to itself: a gloo group may
serve two threads only one at a time, and the loop's stop vote must not wait behind a save. The
rule: no CPU tensor and no pickle ever goes to a data-plane group, and every collective on model
tensors uses tensors on `Topology.device`.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    tp: int
    ep: int
    pp: int
    dp: int
    tp_rank: int
    dp_rank: int
    ep_rank: int
    pp_rank: int
    device: torch.device
    control_group: dist.ProcessGroup  # gloo, the whole world: see the module docstring
    save_group: dist.ProcessGroup  # gloo, the whole world, used only by the background save's thread
    # The pipeline's ranks again, for gradients going back: NCCL matches a pair's point-to-point messages in the
    # order they are posted, ignoring tags, and at pp=2 with virtual stages activations and gradients travel
    # between the same two ranks in orders that differ at each end. A group of their own keeps them apart.
    pp_gradient_group: Optional[dist.ProcessGroup] = None

    @property
    def tp_group(self):
        from megatron.core import parallel_state
        return parallel_state.get_tensor_model_parallel_group()

    @property
    def dp_group(self):
        from megatron.core import parallel_state
        return parallel_state.get_data_parallel_group()

    @property
    def pp_group(self):
        from megatron.core import parallel_state
        return parallel_state.get_pipeline_model_parallel_group()

    @property
    def embedding_group(self):
        """This rank and its peer at the other end of the pipeline, when this rank is on either end."""
        from megatron.core import parallel_state
        return parallel_state.get_embedding_group()

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def reads_batches(self) -> bool:
        """The first stage embeds the tokens and the last scores the labels; stages between need no data."""
        return self.is_first_stage or self.is_last_stage

    @property
    def writes_loader_state(self) -> bool:
        """One rank of each DP rank's TP and PP peers, which all read the same batches, saves where they are."""
        return self.tp_rank == 0 and self.pp_rank == 0

    @property
    def ep_group(self):
        from deepspeed.utils import groups
        return groups._get_expert_parallel_group(expert_group_name(self.ep))

    @property
    def expert_dp_group(self):
        from deepspeed.utils import groups
        return groups._get_expert_data_parallel_group(expert_group_name(self.ep))

    @property
    def mpu(self) -> "DeepSpeedMPU":
        """The adapter create_expert_groups installed for DeepSpeed; its engine takes the same one."""
        from deepspeed.utils import groups
        return groups.mpu

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    def sum_scored(self, tensor: torch.Tensor) -> None:
        """Sum, in place, a figure that each DP rank's last pipeline stage computes (its loss, its tokens
        scored) over DP, and bring the sum to every stage: the other stages hold 0."""
        dist.all_reduce(tensor, group=self.dp_group)
        if self.pp > 1:
            dist.all_reduce(tensor, group=self.pp_group)

    def describe(self) -> str:
        return f"world={self.world_size} tp={self.tp} ep={self.ep} pp={self.pp} dp={self.dp}"


def expert_group_name(ep: int) -> str:
    """The name DeepSpeed's MoE layer looks its expert groups up by."""
    return f"ep_size_{ep}"


def create_expert_groups(ep: int) -> None:
    """DeepSpeed's expert groups in the layout the module docstring describes (its E+M+D layout),
    created before any MoE layer so that the layers and the engine find them by name."""
    from deepspeed.utils import groups as deepspeed_groups

    deepspeed_groups.mpu = DeepSpeedMPU()
    deepspeed_groups._create_expert_data_and_model_parallel(ep, mpu=deepspeed_groups.mpu)


class TopologyError(Exception):
    """This process cannot take its place in the job; the message is the one line the user sees."""


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def cuda_device(local_rank: int, visible_gpus: int) -> torch.device:
    """The GPU of the rank with `local_rank` on its node: one rank per visible GPU."""
    if local_rank >= visible_gpus:
        raise TopologyError(
            f"LOCAL_RANK={local_rank} but this process sees {visible_gpus} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most one rank per "
            "visible GPU on each node, and let every rank see all of its node's GPUs (srun --gpu-bind=none)")
    return torch.device("cuda", local_rank)


_control_groups: list[dist.ProcessGroup] = []  # the loop's, the background save's: made once per process


def init_topology(tp: int, ep: int = 1, pp: int = 1, timeout_minutes: float = 30) -> Topology:
    """Join the job's process group (once per process) and (re)build the model-parallel groups.

    Rendezvous is torch's env:// contract (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which torchrun
    sets; a lone process with none of them set is a world of one. A collective that waits longer than
    `timeout_minutes` (a dead or hung peer) fails instead of holding every GPU of the job.
    """
    from megatron.core import parallel_state

    from parallel.deepspeed_comm import init_deepspeed_distributed

    if torch.cuda.is_available():
        device = cuda_device(int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    timeout = timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        init_deepspeed_distributed(default_backend(), timeout)
    if not _control_groups:  # made once per process: the world does not change within it
        _control_groups.extend(dist.new_group(backend="gloo", timeout=timeout) for _ in range(2))
    from deepspeed.utils import groups as deepspeed_groups

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
        deepspeed_groups._release_process_group_references()  # forget the previous layout's expert groups

    world_size = dist.get_world_size()
    if world_size % (tp * ep * pp):  # the config validates this with friendlier words before launch
        raise ValueError(f"world size {world_size} does not fit tp={tp} x ep={ep} (carved out of DP) x pp={pp}")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, create_gloo_process_groups=False,
        distributed_timeout_minutes=int(math.ceil(timeout_minutes)),
    )
    create_expert_groups(ep)
    stage_size = world_size // pp  # every rank makes every group, in the same order, as torch requires
    pp_gradient_groups = [dist.new_group([first + stage * stage_size for stage in range(pp)], timeout=timeout)
                          if pp > 1 else None for first in range(stage_size)]
    return Topology(
        world_size=world_size,
        rank=dist.get_rank(),
        tp=tp,
        ep=ep,
        pp=pp,
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        ep_rank=deepspeed_groups._get_expert_parallel_rank(expert_group_name(ep)),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        device=device,
        control_group=_control_groups[0],
        save_group=_control_groups[1],
        pp_gradient_group=pp_gradient_groups[dist.get_rank() % stage_size],
    )


@contextmanager
def single_process_world():
    """A lone process as a world of one at TP=1, for as long as the block runs: megatron-core's layers look up
    their tensor-parallel group even when it is one rank (`parallax generate` runs Parallax's own GPT for a
    memory model). Gloo over an in-memory store, so it opens no port that a job on the machine may hold, and
    it is torn down after, so a later world in the same process (a test's) starts clean."""
    from megatron.core import parallel_state

    if dist.is_initialized():
        raise RuntimeError("single_process_world builds its own world of one; run it outside a distributed job")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, create_gloo_process_groups=False)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


class DeepSpeedMPU:
    """The `mpu` DeepSpeed asks for, answering from megatron's groups: DeepSpeed reduces gradients
    over the data-parallel group, and sums the squares of the global gradient norm over the model-
    parallel group (TP x PP: every stage's parameters) counting each parameter replicated over TP
    once, by its tensor-parallel rank. The pipeline size places its expert groups within a stage."""

    def __init__(self):
        from megatron.core import parallel_state

        self.get_tensor_model_parallel_rank = parallel_state.get_tensor_model_parallel_rank
        self.get_tensor_model_parallel_world_size = parallel_state.get_tensor_model_parallel_world_size
        self.get_tensor_model_parallel_group = parallel_state.get_tensor_model_parallel_group
        self.get_pipeline_model_parallel_rank = parallel_state.get_pipeline_model_parallel_rank
        self.get_pipeline_model_parallel_world_size = parallel_state.get_pipeline_model_parallel_world_size
        self.get_pipeline_model_parallel_group = parallel_state.get_pipeline_model_parallel_group
        # DeepSpeed reads the model-parallel rank only to count a parameter replicated over TP once (its fp32
        # ZeRO-0 clip, ZeRO-3): that is the rank within the stage's TP group, not within the TP x PP group.
        self.get_model_parallel_rank = parallel_state.get_tensor_model_parallel_rank
        self.get_model_parallel_world_size = parallel_state.get_model_parallel_group().size
        self.get_model_parallel_group = parallel_state.get_model_parallel_group
        self.get_data_parallel_rank = parallel_state.get_data_parallel_rank
        self.get_data_parallel_world_size = parallel_state.get_data_parallel_world_size
        self.get_data_parallel_group = parallel_state.get_data_parallel_group
