"""What a real one-rank DeepSpeed engine holds in parameters, gradients and optimizer states, for
tests/test_plan.py to hold the memory plan against.

Measured after the second backward (the optimizer has stepped once, so its states exist, and the
new gradients are still alive): the peak of the model states. Every live CPU tensor is found through
the garbage collector and each storage counted once, so DeepSpeed's flat buffers and fp32 master
copies are counted whether or not the model's parameters point into them.
"""
import gc

from tests.distributed.harness import scenario

MEMORY_CASES = {  # name -> overrides of tests.distributed.scenarios.tiny_config
    "fp32_zero0": ("parallel.zero_stage=0",),
    "fp32_zero1": ("parallel.zero_stage=1",),
    "bf16_zero2": ("parallel.zero_stage=2", "train.precision=bf16"),
}
MODEL = ("model.num_layers=4", "model.hidden_size=256", "model.num_heads=4", "model.vocab_size=8192")


def _live_tensor_bytes(model=None) -> int:
    """Bytes of every distinct CPU storage a Python object holds, plus the model's gradients:
    autograd creates `p.grad` without a Python object, so the gc walk alone does not see it."""
    import torch

    tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and obj.device.type == "cpu"]
    if model is not None:
        tensors += [p.grad for p in model.parameters() if p.grad is not None]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _model_state_bytes(*overrides: str) -> int:
    from models.gpt import GPT
    from parallel.engine import build_engine
    from parallel.topology import init_topology
    from tests.distributed.scenarios import fixed_batches, tiny_config

    cfg = tiny_config(*MODEL, *overrides)
    topo = init_topology(tp=1)
    gc.collect()
    before = _live_tensor_bytes()
    engine = build_engine(GPT(cfg.model, cfg.model.vocab_size), cfg, topo)
    tokens = next(iter(fixed_batches(cfg)(topo)))
    for step in range(2):
        loss = engine(tokens[:, :-1], tokens[:, 1:])
        engine.backward(loss)
        if step == 0:
            engine.step()
    del loss
    gc.collect()
    held = _live_tensor_bytes(engine.module) - before - tokens.untyped_storage().nbytes()
    del engine
    gc.collect()
    return held


@scenario(world_size=1)
def plan_measured_memory():
    return {name: _model_state_bytes(*overrides) for name, overrides in MEMORY_CASES.items()}


# What a real GPT computes and keeps for backward, plain and with recurrent memory (n = 4 segments of L = 16
# tokens between 2 x M = 4 memory tokens), for tests/test_plan.py to hold the FLOP and activation plans against.
WORK_MODEL = ("model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.vocab_size=512",
              "model.max_seq_len=64", "model.dropout=0.1", "train.micro_batch_size=2", "data.seq_len=64")
RMT = ("model.memory.num_mem_tokens=4", "model.memory.segment_len=16")
WORK_CASES = {  # name -> overrides of WORK_MODEL
    "plain": (),
    "memory": RMT,
    "memory_bptt1": (*RMT, "model.memory.bptt_segments=1"),
    "memory_bptt0": (*RMT, "model.memory.bptt_segments=0"),
    "memory_one_segment": (*RMT, "data.seq_len=16"),
    "memory_answer_only": (*RMT, "data.fact_task.position=start"),  # only each sample's last label is scored
    "memory_llama_style": (*RMT, "model.position_embedding=rotary", "model.norm=rmsnorm", "model.mlp=swiglu",
                           "model.num_kv_heads=2", "model.linear_bias=false", "model.tie_embeddings=false"),
}


def _work(*overrides: str) -> dict:
    """One training micro-batch's forward and backward FLOPs, as torch's FlopCounterMode counts the matrix
    multiplies the model really runs, and the bytes autograd keeps for backward: every distinct storage a
    saved tensor lives in, parameters excepted (saved by the matmuls, but model states, not activations)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from launcher.config import load_config
    from models.blocks import IGNORE_INDEX
    from models.gpt import GPT
    from parallel.topology import init_topology

    cfg = load_config(None, [*WORK_MODEL, *overrides])
    init_topology(tp=1)
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.model.vocab_size).train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1))
    labels = tokens[:, 1:].clone()
    if cfg.data.fact_task is not None:  # its samples' labels, as data_pipeline/fact_task.py gives them
        labels[:, :-1] = IGNORE_INDEX
    with FlopCounterMode(display=False) as forward, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens[:, :-1], labels)
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    return {"forward_flops": forward.get_total_flops(), "backward_flops": backward.get_total_flops(),
            "kept_bytes": sum(kept.values())}


@scenario(world_size=1)
def plan_measured_work():
    return {name: _work(*overrides) for name, overrides in WORK_CASES.items()}
