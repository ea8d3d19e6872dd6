"""The one place that reads and writes DeepSpeed's private optimizer state, per ZeRO stage.

Where a parameter's fp32 master and Adam moments live differs at every ZeRO stage and precision,
and DeepSpeed documents only part of it (its `safe_get_*`/`safe_set_*` helpers); the rest is
attributes such as `_hp_mapping` and `fp32_partitioned_groups_flat` (and ZeRO-3's partitions, read
through parallel/zero3.py), which change between releases without notice. So this adapter is
tested against one DeepSpeed release, which setup.cfg pins, and refuses any other in one line
rather than saving numbers it may have misplaced.
"""
from __future__ import annotations

from typing import Optional

import torch

from parallel.checkpoint.storage import CheckpointError
from parallel.zero3 import full_shape, held_values, is_partitioned, partition_numel

TESTED_DEEPSPEED = "0.19.8"  # setup.cfg pins the same release; tests/test_checkpoint.py checks they agree
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
MASTER = "param"  # the key of the fp32 master weight next to the moments
KEYS = (MASTER, *ADAM_MOMENTS)


def check_deepspeed_version() -> None:
    import deepspeed

    if deepspeed.__version__ != TESTED_DEEPSPEED:
        raise CheckpointError(
            f"Parallax reaches into DeepSpeed's private optimizer state and ZeRO-3 partitions, tested with DeepSpeed "
            f"{TESTED_DEEPSPEED} only, and DeepSpeed {deepspeed.__version__} is installed; "
            f"pip install deepspeed=={TESTED_DEEPSPEED}")


def replicated_over_dp(param) -> bool:
    """At ZeRO-0 every DP rank holds and steps the whole parameter; ZeRO partitions it."""
    return not is_partitioned(param) and not hasattr(param, "_hp_mapping")


def held_fragment(engine, param, key: str) -> Optional[tuple[int, torch.Tensor]]:
    """(flat offset, fp32 values) of the part of this TP rank's tensor that this rank's optimizer holds,
    for the master weight or an Adam moment; None if it holds none of it."""
    if is_partitioned(param):  # ZeRO-3: this DP rank's partition of the flattened tensor, padded at the end
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        _, start, held = held_values(param)
        value = safe_get_local_fp32_param(param) if key == MASTER else safe_get_local_optimizer_state(param, key)
        return (start, value.flatten()[:held.numel()]) if held.numel() else None
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2 and the bf16 optimizer: a slice of the DP-flat buffer
        mapping = param._hp_mapping
        if mapping is None:
            return None
        return mapping.lp_fragment_address.start, mapping.get_hp_fragment(None if key == MASTER else key)
    return 0, _zero0_fp32(engine, param, key)


def _zero0_fp32(engine, param, key: str) -> torch.Tensor:
    """At ZeRO-0, `param`'s whole fp32 master or Adam moment, flat. In fp32 the torch optimizer steps
    the model's own parameters; in bf16 and fp16 DeepSpeed's FP16_UnfusedOptimizer (the wrapper it
    puts around torch's AdamW) steps an fp32 copy of each."""
    opt, master = engine.optimizer, param
    for params, copies in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", [])):
        master = next((copy for p, copy in zip(params, copies) if p is param), master)
    return (master.data if key == MASTER else base_optimizer(engine).state[master][key]).flatten()


def kept_range(param) -> tuple[int, int]:
    """The flat range of this TP rank's tensor of `param` that this rank keeps (its fp32 master and both
    moments alike): its ZeRO partition, or all of it at ZeRO-0. A load reads and `write_local` takes no other."""
    if is_partitioned(param):
        _, start, held = held_values(param)
        return start, start + held.numel()
    if hasattr(param, "_hp_mapping"):
        address = param._hp_mapping.lp_fragment_address if param._hp_mapping is not None else None
        return (address.start, address.start + address.numel) if address is not None else (0, 0)
    return 0, full_shape(param).numel()


def write_local(engine, param, key: str, kept: torch.Tensor) -> None:
    """Store `kept`, the values of this rank's `kept_range` of its TP rank's tensor of `param`, flat."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    if is_partitioned(param):  # ZeRO-3: the last rank's partition is padded
        mine = torch.nn.functional.pad(kept, (0, partition_numel(param) - kept.numel()))
        safe_set_local_fp32_param(param, mine) if key == MASTER else safe_set_local_optimizer_state(param, mine, key)
    elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2, bf16 optimizer: the weight is all-gathered by refresh_model_weights
        if param._hp_mapping is not None:
            param._hp_mapping.get_hp_fragment(None if key == MASTER else key).data.copy_(kept)
    else:  # ZeRO-0: every DP rank holds the whole tensor
        _zero0_fp32(engine, param, key).copy_(kept)
        if key == MASTER and param.dtype != torch.float32:
            param.data.copy_(kept.view_as(param))  # the bf16/fp16 weight the forward reads; in fp32 it is the master


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW underneath; ZeRO and the bf16 optimizer wrap it as `.optimizer`."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def adam_step(engine) -> int:
    states = [s for s in base_optimizer(engine).state.values() if "step" in s]
    return int(states[0]["step"]) if states else 0


def prepare_adam_state(engine, step: int) -> None:
    """Give a fresh optimizer the state torch's AdamW creates at its first step, so moments can be written into it."""
    base = base_optimizer(engine)
    # ZeRO-3 hands its flat fp32 partitions to the torch optimizer only for the length of a step.
    stepped = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [
        p for group in base.param_groups for p in group["params"]]
    # Where torch's own first step puts it: a fused (or capturable) kernel reads `step` on the parameter's
    # device, and a CUDA one refuses it on the CPU; the other kernels keep it on the CPU.
    on_device = any(group.get("fused") or group.get("capturable") for group in base.param_groups)
    for p in stepped:
        state = base.state[p]
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device if on_device else "cpu")
        for key in ADAM_MOMENTS:
            state.setdefault(key, torch.zeros_like(p, memory_format=torch.preserve_format))
    link_optimizer_state(engine)


def link_optimizer_state(engine) -> None:
    """Point each parameter at its fragment of the flat Adam state (ZeRO-1/2, bf16).

    DeepSpeed 0.19's ZeRO-1/2 link once, after stepping the first param group but before the later
    groups have any state, which leaves those groups' moments unreachable; link again now.
    """
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def refresh_model_weights(engine) -> None:
    """Rebuild the weights the forward pass reads from the fp32 master partitions, once each rank has
    restored its own: ZeRO-3 copies them into the partitions it gathers at every forward; ZeRO-1/2 and
    the bf16 optimizer all-gather them over DP, as after every step, so no rank reads the checkpoint's
    whole weight (a load reads a rank's partition only). At ZeRO-0 write_local wrote the whole weight."""
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        for sub_group in range(len(opt.fp32_partitioned_groups_flat)):
            opt._reassign_or_swap_out_partitioned_parameters(sub_group)
    elif hasattr(opt, "update_lp_params"):
        opt.update_lp_params()


def count_once_across_stages(param) -> None:
    """Leave `param`, a copy of a parameter another pipeline stage holds, out of the global gradient
    norm (DeepSpeed skips parameters so marked, as its PipelineEngine marks tied copies) and out of
    checkpoints (held_pieces)."""
    from deepspeed.runtime.constants import PIPE_REPLICATED

    setattr(param, PIPE_REPLICATED, True)


def is_copy_across_stages(param) -> bool:
    from deepspeed.runtime.constants import PIPE_REPLICATED

    return getattr(param, PIPE_REPLICATED, False)


def accumulated_gradient(param) -> torch.Tensor:
    """The gradient of `param` accumulated over the step's micro-batches, where the optimizer reduces
    and steps from: the bf16 optimizer's fp32 copy, else the parameter's own `.grad`."""
    fp32 = getattr(param, "_hp_grad", None)
    return fp32 if fp32 is not None else param.grad


def start_micro_batch_backward(engine) -> None:
    """What DeepSpeed's forward hooks do before each backward, for a backward of outputs that did not
    come out of `engine.forward` (a pipeline stage's): the bf16 optimizer adds `.grad` to its fp32 sum
    after every backward, so `.grad` must start each one from zero, or a micro-batch is summed again at
    every later one. DeepSpeed's PipelineEngine does the same (`clear_lp_grads`)."""
    if hasattr(engine.optimizer, "clear_lp_grads"):
        engine.optimizer.clear_lp_grads()
