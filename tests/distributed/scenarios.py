"""The distributed scenarios behind the parity tests, grouped by world size (see harness.py).

Every scenario trains or evaluates the same tiny GPT from the same seed on the same global batches,
so any difference from the one-process reference is a bug in how the layout splits the work.
"""
import math

import torch
import torch.distributed as dist

from tests.distributed.harness import scenario

# megatron-core, DeepSpeed and the data pipeline are imported inside the scenarios, so that the
# pytest process, which only reads the registry, does not pay for them.

VOCAB = 512
GLOBAL_BATCH = 8


def tiny_config(*overrides: str):
    from launcher.config import load_config

    return load_config(None, [
        "model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.max_seq_len=32",
        f"model.vocab_size={VOCAB}", "data.seq_len=32", "train.steps=5", f"train.micro_batch_size={GLOBAL_BATCH}",
        "optim.lr=3e-3", "optim.warmup_steps=2", "optim.min_lr=3e-4", "logging.run_dir=/tmp/parallax-test-runs",
        *overrides,
    ])


def fixed_batches(cfg):
    """The same global batches at every layout: DP rank r takes rows r*m..(r+1)*m of each micro-step."""
    def source(topo):
        m, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
        assert m * accum * topo.dp == GLOBAL_BATCH, "a parity scenario must keep the global batch"
        # Learnable token streams (each row counts up by its own stride), so losses fall within 5 steps.
        g = torch.Generator().manual_seed(0)
        shape = (cfg.train.steps, GLOBAL_BATCH, 1)
        start, stride = torch.randint(0, VOCAB, shape, generator=g), torch.randint(1, 4, shape, generator=g)
        data = (start + stride * torch.arange(cfg.data.seq_len + 1)) % VOCAB
        for step_batch in data:
            for j in range(accum):
                start = (j * topo.dp + topo.dp_rank) * m
                yield step_batch[start:start + m]
    return source


def train_records(cfg, batches=None) -> list[dict]:
    """Every step's record of a run, asked for explicitly: the training loop itself keeps none."""
    from launcher.train import train

    records = []
    train(cfg, batches=batches, records=records)
    return records


def run_training(*overrides: str) -> list[dict]:
    cfg = tiny_config(*overrides)
    return train_records(cfg, batches=fixed_batches(cfg))


def full_shape(param, tensor: torch.Tensor, tp_group) -> torch.Tensor:
    """`tensor` (the gradient or a state of `param`) joined over TP to full size if megatron split `param`."""
    return gather_tp(tensor, param.partition_dim, tp_group) if getattr(param, "tensor_model_parallel", False) else tensor


def gather_tp(tensor: torch.Tensor, dim: int, tp_group) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, tensor.contiguous(), group=tp_group)
    return torch.cat(parts, dim=dim)


def model_outputs(*overrides: str) -> dict:
    """Logits, loss and gradients of one forward/backward, gathered to full (TP=1) shapes."""
    from models.gpt import GPT
    from parallel.topology import init_topology

    cfg = tiny_config(*overrides)
    topo = init_topology(tp=cfg.parallel.tp)
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model, VOCAB, sequence_parallel=cfg.parallel.sequence_parallel)
    tokens = next(iter(fixed_batches(cfg)(topo)))
    with torch.no_grad():
        logits = gather_tp(model(tokens[:, :-1]), -1, topo.tp_group)
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    grads = {name: full_shape(p, p.grad, topo.tp_group) for name, p in model.named_parameters()}
    return {"logits": logits, "loss": loss.item(), "grads": grads}


def initial_weights(*overrides: str) -> dict:
    """For the GPT-2 and the Llama-style model, built as training builds them: the initial weights
    gathered to full shapes, the elements this rank drew from a normal distribution while building
    them (every `normal_` counts, megatron's and nn.init's included), how many of its weight elements
    are split over TP, and the most of any parameter's TP-local elements it held once built."""
    from models.gpt import GPT
    from parallel.engine import building_model
    from parallel.topology import init_topology
    from parallel.zero3 import held_values, is_partitioned

    results = {}
    for style, extra in (("gpt2", ()), ("llama_style", LLAMA_STYLE)):
        cfg = tiny_config(*overrides, *extra)
        topo = init_topology(tp=cfg.parallel.tp)
        drawn, inside, normal_ = 0, False, torch.Tensor.normal_

        def counted(tensor, *args, **kwargs):
            nonlocal drawn, inside
            if inside:  # a torch function mode (torch.device) calls the method again from within it
                return normal_(tensor, *args, **kwargs)
            drawn, inside = drawn + tensor.numel(), True
            try:
                return normal_(tensor, *args, **kwargs)
            finally:
                inside = False

        torch.Tensor.normal_ = counted
        try:
            torch.manual_seed(cfg.train.seed)
            with building_model(cfg, topo):
                model = GPT(cfg.model, VOCAB)
        finally:
            torch.Tensor.normal_ = normal_
        named = [(name, p, *held_values(p)) for name, p in model.named_parameters()]
        results[style] = {
            "weights": {name: full_shape(p, gather_dp(shape, held, topo.dp_group) if is_partitioned(p) else p.detach(),
                                         topo.tp_group) for name, p, shape, _, held in named},
            "drawn": drawn,
            "split_weights": sum(math.prod(shape) for name, p, shape, _, _ in named
                                 if getattr(p, "tensor_model_parallel", False) and name.endswith("weight")),
            "most_held": max((p.data.numel() + (held.numel() if is_partitioned(p) else 0)) / math.prod(shape)
                             for _, p, shape, _, held in named),
        }
    return results


def gather_dp(shape: torch.Size, held: torch.Tensor, dp_group) -> torch.Tensor:
    """The TP-local tensor of a ZeRO-3 partitioned parameter from the partitions the DP ranks hold."""
    per_rank = -(-math.prod(shape) // dist.get_world_size(dp_group))
    parts = [torch.empty(per_rank, dtype=held.dtype) for _ in range(dist.get_world_size(dp_group))]
    dist.all_gather(parts, torch.nn.functional.pad(held, (0, per_rank - held.numel())), group=dp_group)
    return torch.cat(parts)[:math.prod(shape)].view(shape)


# The Llama-style GPT: grouped-query attention (2 key/value heads for 4 query heads, so TP=2 gives each
# rank one group), SwiGLU, no linear biases, an untied output layer, rotary positions and RMSNorm.
LLAMA_STYLE = ("model.position_embedding=rotary", "model.norm=rmsnorm", "model.mlp=swiglu", "model.num_kv_heads=2",
               "model.linear_bias=false", "model.tie_embeddings=false", "model.rotary_base=500000")

# --- one process: the references -------------------------------------------------------------

@scenario(world_size=1)
def reference_model():
    return model_outputs()


@scenario(world_size=1)
def reference_model_llama_style():
    return model_outputs(*LLAMA_STYLE)


@scenario(world_size=1)
def reference_initial_weights():
    return initial_weights()


@scenario(world_size=1)
def reference_training():
    return run_training("parallel.zero_stage=0")


@scenario(world_size=1)
def reference_training_llama_style():
    return run_training("parallel.zero_stage=0", *LLAMA_STYLE)


# --- two ranks ---------------------------------------------------------------------------------

@scenario(world_size=2)
def tp2_initial_weights():
    return initial_weights("parallel.tp=2")


@scenario(world_size=2)
def dp2_zero3_initial_weights():
    return initial_weights("parallel.zero_stage=3")


@scenario(world_size=2)
def tp2_model():
    return model_outputs("parallel.tp=2")


@scenario(world_size=2)
def tp2_model_llama_style():
    return model_outputs("parallel.tp=2", *LLAMA_STYLE)


@scenario(world_size=2)
def tp2_sequence_parallel_model():
    return model_outputs("parallel.tp=2", "parallel.sequence_parallel=true")


@scenario(world_size=2)
def tp2_sequence_parallel_model_llama_style():
    return model_outputs("parallel.tp=2", "parallel.sequence_parallel=true", *LLAMA_STYLE)


def tensor_parallel_traffic(*overrides: str) -> dict:
    """Bytes this rank sends in one forward and backward of the tiny GPT at TP=2 (see traffic.py),
    and the bytes of gradients of parameters every TP rank holds whole (norms, row-parallel biases,
    position embeddings): sequence parallelism all-reduces those, as megatron does."""
    from models.gpt import GPT
    from parallel.topology import init_topology
    from tests.distributed.traffic import CollectiveBytes, ring_all_reduce_bytes

    cfg = tiny_config("parallel.tp=2", *overrides)
    topo = init_topology(tp=cfg.parallel.tp)
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model, VOCAB, sequence_parallel=cfg.parallel.sequence_parallel)
    tokens = next(iter(fixed_batches(cfg)(topo)))
    with CollectiveBytes(group_size=topo.tp) as sent:
        model(tokens[:, :-1], tokens[:, 1:]).backward()
    whole = [p for p in model.parameters() if not getattr(p, "tensor_model_parallel", False)]
    return {"bytes": sent.bytes, "ops": sent.ops, "replicated_gradient_bytes": sum(
        ring_all_reduce_bytes(p.numel() * p.element_size(), topo.tp) for p in whole)}


@scenario(world_size=2)
def tp2_traffic():
    return tensor_parallel_traffic()


@scenario(world_size=2)
def tp2_sequence_parallel_traffic():
    return tensor_parallel_traffic("parallel.sequence_parallel=true")


@scenario(world_size=2)
def tp2_training():
    return run_training("parallel.tp=2", "parallel.zero_stage=1")


@scenario(world_size=2)
def tp2_sequence_parallel_training():
    return run_training("parallel.tp=2", "parallel.zero_stage=1", "parallel.sequence_parallel=true")


@scenario(world_size=2)
def tp2_activation_checkpointing_training():
    return run_training("parallel.tp=2", "parallel.zero_stage=2", "parallel.activation_checkpointing=true")


def _dp2_zero(stage: int):
    return run_training(f"train.micro_batch_size={GLOBAL_BATCH // 2}", f"parallel.zero_stage={stage}")


@scenario(world_size=2)
def dp2_zero0_training():
    return _dp2_zero(0)


@scenario(world_size=2)
def dp2_zero1_training():
    return _dp2_zero(1)


@scenario(world_size=2)
def dp2_zero2_training():
    return _dp2_zero(2)


@scenario(world_size=2)
def dp2_zero3_training():
    return _dp2_zero(3)


@scenario(world_size=2)
def dp2_zero3_training_llama_style():
    return run_training(f"train.micro_batch_size={GLOBAL_BATCH // 2}", "parallel.zero_stage=3", *LLAMA_STYLE)


@scenario(world_size=2)
def dp2_zero1_grad_accum_training():
    return run_training("train.micro_batch_size=2", "train.grad_accum=2", "parallel.zero_stage=1")


@scenario(world_size=2)
def dp2_zero1_bf16_training():
    return run_training(f"train.micro_batch_size={GLOBAL_BATCH // 2}", "parallel.zero_stage=1", "train.precision=bf16")


@scenario(world_size=2)
def engines_built():
    """What DeepSpeed builds at DP=2 for fp32 at ZeRO-0 and for bf16 at every ZeRO stage: its optimizer, the
    torch AdamW inside it and whether that runs the fused kernel, and the dtypes in which it accumulates and
    reduces gradients."""
    from models.gpt import GPT
    from parallel.checkpoint.deepspeed_adapter import base_optimizer
    from parallel.engine import build_engine
    from parallel.topology import init_topology

    built = {}
    for precision, stage in (("fp32", 0), ("bf16", 0), ("bf16", 1), ("bf16", 2), ("bf16", 3)):
        cfg = tiny_config(f"train.precision={precision}", f"parallel.zero_stage={stage}",
                          f"train.micro_batch_size={GLOBAL_BATCH // 2}")
        topo = init_topology(tp=1)
        engine = build_engine(GPT(cfg.model, VOCAB), cfg, topo)
        adamw = base_optimizer(engine)
        built[precision, stage] = {
            "optimizer": type(engine.optimizer).__name__, "adamw": type(adamw).__name__,
            "fused": adamw.defaults["fused"], "accumulate": engine.get_data_types()[1],
            "reduce": engine.communication_data_type}
    return built


# --- four ranks --------------------------------------------------------------------------------

@scenario(world_size=4)
def tp2_dp2_zero2_training():
    return run_training("parallel.tp=2", f"train.micro_batch_size={GLOBAL_BATCH // 2}", "parallel.zero_stage=2")


@scenario(world_size=4)
def tp2_dp2_zero3_training():
    return run_training("parallel.tp=2", f"train.micro_batch_size={GLOBAL_BATCH // 2}", "parallel.zero_stage=3")
