"""Scenarios for issue 5: expert parallelism computes what one process (or EP=1) computes."""
import torch
import torch.distributed as dist

from tests.distributed.harness import scenario
from tests.distributed.scenarios import GLOBAL_BATCH, fixed_batches, full_shape, run_training, tiny_config

NUM_EXPERTS = 4
# Capacity for every token at every layout (capacity factor >= experts / top_k), in training and in
# evaluation: nothing drops, so the split of tokens over ranks cannot change which tokens an expert sees.
MOE = (f"model.moe={{num_experts: {NUM_EXPERTS}, every: 1, top_k: 2, capacity_factor: {NUM_EXPERTS}.0, "
       f"eval_capacity_factor: {NUM_EXPERTS}.0, z_loss_coef: 1.0e-3}}")
# The load-balancing loss is computed over each DP rank's own tokens (GShard's groups), so it is a
# per-layout quantity; comparing with one process needs it off.
NO_AUX = "model.moe.aux_loss_coef=0.0"
STEPS = "train.steps=3"


def moe_gradients(*overrides: str) -> dict:
    """One engine step's reduced gradients, with every MoE layer's experts gathered to all experts."""
    from launcher.train import _seed_everything
    from models.gpt import GPT
    from models.moe import is_expert_parameter
    from parallel.engine import build_engine
    from parallel.topology import init_topology

    cfg = tiny_config(MOE, "parallel.zero_stage=0", *overrides)
    topo = init_topology(tp=cfg.parallel.tp, ep=cfg.parallel.ep)
    _seed_everything(cfg.train.seed)
    model = GPT(cfg.model, 512, expert_parallel_size=cfg.parallel.ep)
    engine = build_engine(model, cfg, topo)
    tokens = next(iter(fixed_batches(cfg)(topo)))
    loss = engine(tokens[:, :-1], tokens[:, 1:])
    engine.backward(loss)  # ZeRO-0 leaves the reduced gradients in p.grad
    dist.all_reduce(loss := loss.detach().clone(), group=topo.dp_group)
    experts, dense = {}, {}
    for name, p in model.named_parameters():
        if not is_expert_parameter(p):
            dense[name] = full_shape(p, p.grad.clone(), topo.tp_group)
            continue
        # ...deepspeed_experts.<local index>.<weight name>: file under the global expert id
        prefix, local, rest = name.split(".deepspeed_experts.")[0], *name.split(".deepspeed_experts.")[1].split(".", 1)
        parts = [torch.empty_like(p.grad) for _ in range(dist.get_world_size(topo.ep_group))]
        dist.all_gather(parts, p.grad.contiguous(), group=topo.ep_group)
        local_count = model.cfg.moe.num_experts // cfg.parallel.ep
        for ep_rank, grad in enumerate(parts):
            experts[f"{prefix}.expert{ep_rank * local_count + int(local)}.{rest}"] = grad
    return {"loss": loss.item() / topo.dp, "experts": experts, "dense": dense}


@scenario(world_size=2)
def moe_ep1_gradients():
    return moe_gradients("train.micro_batch_size=4", "parallel.ep=1")


@scenario(world_size=2)
def moe_ep2_gradients():
    return moe_gradients("train.micro_batch_size=4", "parallel.ep=2")


@scenario(world_size=2)
def moe_ep1_training():
    return run_training(MOE, STEPS, "train.micro_batch_size=4", "parallel.ep=1", "parallel.zero_stage=1")


@scenario(world_size=2)
def moe_ep2_training():
    return run_training(MOE, STEPS, "train.micro_batch_size=4", "parallel.ep=2", "parallel.zero_stage=1")


@scenario(world_size=2)
def moe_ep2_zero2_training():
    return run_training(MOE, STEPS, "train.micro_batch_size=4", "parallel.ep=2", "parallel.zero_stage=2")


@scenario(world_size=1)
def moe_reference_gradients():
    return moe_gradients(NO_AUX)


@scenario(world_size=1)
def moe_reference_training():
    return run_training(MOE, NO_AUX, STEPS, "parallel.zero_stage=0")


@scenario(world_size=4)
def moe_tp2_ep2_gradients():
    return moe_gradients(NO_AUX, "parallel.tp=2", f"train.micro_batch_size={GLOBAL_BATCH // 2}", "parallel.ep=2")


@scenario(world_size=4)
def moe_tp2_ep2_zero1_training():
    return run_training(MOE, NO_AUX, STEPS, "parallel.tp=2", f"train.micro_batch_size={GLOBAL_BATCH // 2}",
                        "parallel.ep=2", "parallel.zero_stage=1")


@scenario(world_size=1)
def moe_router():
    """One MoE layer on fixed tokens and a fixed gate: what it routes, drops and charges, for the test
    to recompute by hand. Small capacity so that tokens drop."""
    from models.config import MoEConfig, ModelConfig
    from models.moe import MoEFeedForward
    from parallel.topology import init_topology

    init_topology(tp=1)
    out = {}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 32, generator=g)  # [s, b, h]: 32 tokens
    gate = torch.randn(NUM_EXPERTS, 32, generator=g)
    for top_k in (1, 2):
        moe_cfg = MoEConfig(num_experts=NUM_EXPERTS, top_k=top_k, capacity_factor=0.5, min_capacity=1)
        layer = MoEFeedForward(ModelConfig(hidden_size=32, num_heads=4, moe=moe_cfg), 1, output_std=0.02)
        with torch.no_grad():
            layer.gate_weight.copy_(gate)
        y = layer(x)
        out[top_k] = {"output": y.detach(), **{k: v for k, v in layer.metrics.items()}}
    return {"x": x, "gate": gate, "capacity_factor": 0.5, "by_top_k": out}
