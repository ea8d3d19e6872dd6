"""The DeepSpeed engine: ZeRO stage, precision, AdamW, clipping, accumulation and the LR schedule.

DeepSpeed reduces gradients over dp_group only and computes the global gradient norm counting each
tensor-parallel shard once, because it is handed `DeepSpeedMPU`, whose groups are megatron's.
"""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Iterator

import torch

from parallel.topology import Topology
from parallel.zero3 import full_shape

if TYPE_CHECKING:
    from launcher.config import OptimConfig, RunConfig


def deepspeed_config(cfg: RunConfig, topo: Topology) -> dict:
    precision, o = cfg.train.precision, cfg.optim
    return {
        **_bf16_gradients_in_fp32(precision, cfg.parallel.zero_stage),
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.micro_batch_size * cfg.train.grad_accum * topo.dp,
        # torch's AdamW with its fused kernel, one pass over masters, gradients and moments: DeepSpeed's default
        # (foreach) took 13% of a GPT-2 XL step on an H200, and on the CPU the fused step is ~4x faster.
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "torch_adam": True, "fused": True},
        },
        "gradient_clipping": o.grad_clip,
        # ZeRO-3 makes its fp32 masters one sub-group at a time, each through a transient second copy:
        # DeepSpeed's default sub-group of 1e9 elements would add 4 GB to a rank's construction peak.
        "zero_optimization": {"stage": cfg.parallel.zero_stage, "sub_group_size": 10**8},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # A pipeline runs a backward per micro-batch and chunk, and steps once: the step, not a count of
        # backwards, is where gradients are reduced (parallel/pipeline/runner.py).
        **({"managed_gradient_accumulation": False} if topo.pp > 1 else {}),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _bf16_gradients_in_fp32(precision: str, zero_stage: int) -> dict:
    """In bf16 at ZeRO 1/2, gradients accumulate over micro-batches and are reduced over DP in fp32,
    as Megatron does (its main_grad): bf16 keeps 8 bits of mantissa, so summing many micro-batches
    or ranks in it loses the small contributions. (ZeRO-0 in bf16 has no fp32 gradient path in
    DeepSpeed 0.19, and ZeRO-3 partitions its gradients in its own buffers.)"""
    if precision != "bf16" or zero_stage not in (1, 2):
        return {}
    return {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}


PARAMS_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def building_model(cfg: RunConfig, topo: Topology) -> Iterator[None]:
    """The model built inside is built as the engine will train it, and no bigger: on this rank's
    device, in the precision it trains in (the engine would cast it, and its fp32 masters are made
    from those values either way), and at ZeRO-3 partitioned over dp_group as each layer is built
    (`deepspeed.zero.Init`), so no rank holds more of a TP shard than its partition and one layer.

    zero.Init is told to leave tensor creation alone (`tensor_overrides=[]`): its dtype override
    would also turn the fp32 constants a model computes as it is built (rotary angles) into bf16."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(PARAMS_DTYPE[cfg.train.precision])
    try:
        with torch.device(topo.device), contextlib.ExitStack() as stack:
            if cfg.parallel.zero_stage == 3:  # parallel/zero3.py then reads DeepSpeed's partitions
                import deepspeed

                from parallel.checkpoint.deepspeed_adapter import check_deepspeed_version

                check_deepspeed_version()

                # mpu: DeepSpeed checks the config's batch size against the DP size it gives, else the world size
                stack.enter_context(deepspeed.zero.Init(
                    data_parallel_group=topo.dp_group, config_dict_or_path=deepspeed_config(cfg, topo), mpu=topo.mpu,
                    mem_efficient_linear=False, tensor_overrides=[]))
            yield
    finally:
        torch.set_default_dtype(previous)


def warmup_cosine(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warmup, then cosine down to min_lr."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and norm gains are not regularised (as in GPT-3 and Megatron)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(full_shape(p)) >= 2 else no_decay).append(p)
    # Named, because DeepSpeed splits each group into expert and non-expert groups by name.
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def build_engine(model: torch.nn.Module, cfg: RunConfig, topo: Topology):
    import deepspeed

    optim = cfg.optim
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=_param_groups(model, optim.weight_decay),
        config=deepspeed_config(cfg, topo),
        mpu=topo.mpu,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, optim, cfg.train.steps) / optim.lr
        ),
    )
    _adapt_plain_fp32_path(engine, topo.dp)
    return engine


def _adapt_plain_fp32_path(engine, dp: int) -> None:
    """At ZeRO-0 in fp32 no DeepSpeed optimizer wrapper sits between the engine and AdamW, and
    that path has four gaps:
    - a non-finite gradient is applied: the weights and moments become NaN, where DeepSpeed's optimizers at
      every other stage and precision skip the step (their `overflow`), and the engine then leaves the LR
      schedule alone and counts the step in `skipped_steps`: skip it the same way;
    - the engine computes the TP-aware global gradient norm to clip and drops it, while every other
      stage and precision records it for `get_global_grad_norm()`: keep it (with no clipping too);
    - that norm counts a pipeline's tied-embedding copy a second time (the optimizers skip it);
    - with one data-parallel rank it still copies every gradient into a bucket and all-reduces it
      over a group of one (measured: ~1.6% of a step): skip that.
    The skip reads the norm on the host once per step, as DeepSpeed's optimizers do on every other path.
    """
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return
    from deepspeed.runtime.utils import clip_grad_norm_

    from parallel.checkpoint.deepspeed_adapter import is_copy_across_stages

    params = list(engine.module.parameters())
    copies = [p for p in params if is_copy_across_stages(p)]  # a pipeline's last-stage copy of a tied embedding
    originals = [p for p in params if not is_copy_across_stages(p)]
    optimizer, take_step = engine.optimizer, engine.optimizer.step
    max_norm = engine.gradient_clipping() or math.inf  # inf: the norm is taken, nothing is clipped

    def step_unless_non_finite(*args, **kwargs):
        # DeepSpeed's clip counts every parameter it is given: the copy is left out of the norm and then clipped
        # by the coefficient its original was clipped by, so the two stay equal.
        engine._global_grad_norm = clip_grad_norm_(originals, max_norm=max_norm, mpu=engine.mpu)
        torch.nn.utils.clip_grads_with_norm_(copies, max_norm, engine._global_grad_norm)
        optimizer.overflow = not bool(torch.isfinite(engine._global_grad_norm).all())
        if not optimizer.overflow:
            take_step(*args, **kwargs)

    engine.clip_fp32_gradients = lambda: None  # clipped in the step above, where the norm is also checked
    optimizer.step = step_unless_non_finite
    if dp == 1:
        engine.enable_backward_allreduce = False


def loss_scale(engine):
    """fp16's current dynamic loss scale, as DeepSpeed reports it to its own monitors (a number or a
    device tensor: read it on the host only at a logging step); None in fp32/bf16."""
    return engine._get_optimizer_loss_scale() if engine.fp16_enabled() else None
