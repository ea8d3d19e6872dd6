"""Issue 26's distributed scenarios: the recurrent memory transformer (model.memory) at one process and at
every layout it runs at (DP at each ZeRO stage, TP with and without sequence parallelism, TP x DP, MoE at
EP=2), and the single-process checks behind tests/test_memory.py.

The memory model is the parity scenarios' tiny GPT with 4 memory tokens and segments of 8 tokens, trained
on 3-segment windows (data.seq_len=24): a segment with its memory is 16 of the model's 32 positions.
"""
import os
from pathlib import Path

import torch

from tests.distributed.harness import scenario
from tests.distributed.scenarios import (GLOBAL_BATCH, LLAMA_STYLE, VOCAB, fixed_batches, model_outputs,
                                         run_training, tiny_config, train_records)
from tests.distributed.scenarios_moe import MOE, NO_AUX

MEM_TOKENS, SEGMENT_LEN, SEGMENTS, STEPS = 4, 8, 3, 3
MEMORY = (f"model.memory.num_mem_tokens={MEM_TOKENS}", f"model.memory.segment_len={SEGMENT_LEN}",
          f"data.seq_len={SEGMENTS * SEGMENT_LEN}", f"train.steps={STEPS}")
DP2 = f"train.micro_batch_size={GLOBAL_BATCH // 2}"
SEQUENCE_PARALLEL = ("parallel.tp=2", "parallel.sequence_parallel=true")


def _model(cfg, topo):
    from models.gpt import GPT

    torch.manual_seed(cfg.train.seed)
    return GPT(cfg.model, VOCAB)


@scenario(world_size=1)
def memory_off_forward():
    """A model without model.memory, GPT-2 and Llama style: how its attention was called (the causal path,
    no mask), whether the memory path ran, and its parameters' names. That its numbers are unchanged is what
    every other parity, export and checkpoint test of the suite holds it to."""
    import models.gpt as gpt
    from parallel.topology import init_topology

    results = {}
    for style, extra in (("gpt2", ()), ("llama_style", LLAMA_STYLE)):
        cfg = tiny_config(*extra)
        topo = init_topology(tp=1)
        tokens = next(iter(fixed_batches(cfg)(topo)))
        calls, memory_path_ran = [], []
        sdpa, with_memory = gpt.F.scaled_dot_product_attention, gpt.GPT.forward_with_memory

        def recorded(*args, **kwargs):
            calls.append({"is_causal": kwargs.get("is_causal"), "attn_mask": kwargs.get("attn_mask")})
            return sdpa(*args, **kwargs)

        gpt.F.scaled_dot_product_attention = recorded
        gpt.GPT.forward_with_memory = lambda *a, **k: memory_path_ran.append(True) or with_memory(*a, **k)
        try:
            model = _model(cfg, topo)
            logits = model(tokens[:, :-1]).detach()
            loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
        finally:
            gpt.F.scaled_dot_product_attention, gpt.GPT.forward_with_memory = sdpa, with_memory
        results[style] = {"calls": calls, "memory_path_ran": bool(memory_path_ran),
                          "names": [name for name, _ in model.named_parameters()]}
    return results


def _segment_input_gradients(bptt: int, *extra: str) -> dict:
    """One forward and backward of the memory model in which only the last segment is scored: the gradient
    that reaches each segment's token embeddings (an added zero perturbation per segment) and the initial
    memory. Plus the logits' causality: changing the window's last token changes no earlier logit."""
    from models.blocks import IGNORE_INDEX
    from parallel.topology import init_topology

    cfg = tiny_config(*MEMORY, f"model.memory.bptt_segments={bptt}", *extra)
    topo = init_topology(tp=1)
    model = _model(cfg, topo)
    tokens = next(iter(fixed_batches(cfg)(topo)))
    inputs, labels = tokens[:, :-1], tokens[:, 1:].clone()
    labels[:, :(SEGMENTS - 1) * SEGMENT_LEN] = IGNORE_INDEX  # the last segment's loss only
    perturbations = []

    def perturb(module, args, output):
        delta = torch.zeros_like(output, requires_grad=True)
        perturbations.append(delta)
        return output + delta

    hook = model.embedding.register_forward_hook(perturb)
    model(inputs, labels).backward()
    hook.remove()
    with torch.no_grad():
        logits = model(inputs)
        changed = inputs.clone()
        changed[:, -1] = (changed[:, -1] + 1) % VOCAB
        logits_changed = model(changed)
    return {
        "segment_grads": [None if d.grad is None else d.grad.abs().sum().item() for d in perturbations],
        "memory_grad": model.memory.weight.grad.abs().sum().item() if model.memory.weight.grad is not None else None,
        "logits_shape": tuple(logits.shape),
        "earlier_logits_unchanged": torch.equal(logits[:-1], logits_changed[:-1]),
        "last_logits_changed": not torch.equal(logits[-1], logits_changed[-1]),
    }


@scenario(world_size=1)
def memory_bptt_gradients():
    return {bptt: _segment_input_gradients(bptt) for bptt in (-1, 1, 0)} | {
        "llama_style_bptt1": _segment_input_gradients(1, *LLAMA_STYLE)}


@scenario(world_size=1)
def memory_reference_training():
    return run_training("parallel.zero_stage=0", *MEMORY)


@scenario(world_size=2)
def memory_tp2_training():
    return run_training("parallel.tp=2", "parallel.zero_stage=1", *MEMORY)


@scenario(world_size=2)
def memory_dp2_zero3_training():
    """3 steps at DP=2 ZeRO-3, saving at step 2; the same layout resumed from that checkpoint for step 3; the
    tensors the step-2 checkpoint holds (the memory's initial state among them, a parameter like any other)."""
    from parallel.checkpoint.layout_free import read_weights
    from tests.distributed.scenarios_checkpoint import ResumableBatches

    root = Path(os.environ["PARALLAX_SCENARIO_DIR"]) / "memory-runs"

    def train(name: str, *overrides: str) -> list[dict]:
        cfg = tiny_config(f"train.micro_batch_size={GLOBAL_BATCH // 2}", "parallel.zero_stage=3", *MEMORY,
                          "checkpoint.interval=2", f"logging.run_dir={root / name}", *overrides)
        return train_records(cfg, batches=lambda topo: ResumableBatches(cfg, topo))

    straight = train("straight", "checkpoint.resume=none")
    saved = root / "straight" / "checkpoints" / "step-00000002"
    resumed = train("resumed", f"checkpoint.resume={saved}")
    weights = read_weights(saved)
    return {"straight": straight, "resumed": resumed,
            "saved_memory": weights.get("memory.weight"), "saved_names": sorted(weights)}


@scenario(world_size=1)
def memory_reference_model():
    return {"gpt2": model_outputs(*MEMORY), "llama_style": model_outputs(*MEMORY, *LLAMA_STYLE)}


@scenario(world_size=2)
def memory_tp2_sequence_parallel_model():
    """Every parameter's gradient, not only the loss curve: Adam's update hardly changes if one gradient is
    scaled, so a memory or position gradient summed over TP twice would pass a loss-curve comparison. The
    Llama style adds rotary positions and an output layer of its own."""
    return {"gpt2": model_outputs(*SEQUENCE_PARALLEL, *MEMORY),
            "llama_style": model_outputs(*SEQUENCE_PARALLEL, *MEMORY, *LLAMA_STYLE)}


@scenario(world_size=2)
def memory_tp2_sequence_parallel_training():
    return run_training(*SEQUENCE_PARALLEL, "parallel.zero_stage=1", *MEMORY)


@scenario(world_size=2)
def memory_dp2_training():
    """DP=2 at ZeRO-0, 1 and 2 (ZeRO-3: memory_dp2_zero3_training)."""
    return {zero: run_training(DP2, f"parallel.zero_stage={zero}", *MEMORY) for zero in (0, 1, 2)}


@scenario(world_size=4)
def memory_tp2_dp2_training():
    return run_training("parallel.tp=2", DP2, "parallel.zero_stage=2", *MEMORY)


@scenario(world_size=1)
def memory_moe_reference_training():
    """The MoE memory model at one process, without the load-balancing loss, which is computed over each DP
    rank's own tokens (tests/distributed/scenarios_moe.py); the z-loss stays, so the router loss is in."""
    return run_training(MOE, NO_AUX, "parallel.zero_stage=0", *MEMORY)


@scenario(world_size=2)
def memory_moe_ep2_training():
    return run_training(MOE, NO_AUX, DP2, "parallel.ep=2", "parallel.zero_stage=1", *MEMORY)


@scenario(world_size=1)
def memory_moe_router_losses():
    """One training forward of the MoE memory model: its loss, the language-model loss alone, and the router
    loss of every MoE layer's every forward (one per segment), recorded as each forward ends."""
    from models.moe import MoEFeedForward
    from parallel.topology import init_topology

    cfg = tiny_config(MOE, *MEMORY)
    topo = init_topology(tp=1)
    model = _model(cfg, topo)
    tokens = next(iter(fixed_batches(cfg)(topo)))
    router_losses = []
    hooks = [module.register_forward_hook(lambda mlp, args, out: router_losses.append(mlp.router_loss.item()))
             for module in model.modules() if isinstance(module, MoEFeedForward)]
    with torch.no_grad():
        loss = model(tokens[:, :-1], tokens[:, 1:]).item()
        for hook in hooks:
            hook.remove()
        total, scored = model(tokens[:, :-1], tokens[:, 1:], reduction="sum")
    return {"loss": loss, "language_model_loss": (total / scored).item(), "router_losses": router_losses,
            "moe_layers": len(hooks), "metrics": model.moe_metrics()}
