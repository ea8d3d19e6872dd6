"""Issue 6's scenarios: T5 against Hugging Face's implementation, and T5 under TP and ZeRO-3 against
one process (see harness.py; the world-size-2 ones run in the same launch as the GPT scenarios).

The tiny T5 has heads narrower than hidden / heads (kv_channels), a decoder deeper than its encoder,
and sequences longer than the relative bias's max_distance, so every T5-specific path is exercised.
"""
import torch

from tests.distributed.harness import scenario
from tests.distributed.scenarios import full_shape, gather_tp, train_records

VOCAB = 512
GLOBAL_BATCH = 4
SENTINELS = tuple(range(VOCAB - 1, VOCAB - 101, -1))  # T5's convention: <extra_id_k> is the k-th id from the top
EOD, PAD = 1, 0  # T5's ids: the decoder starts from pad = 0
T5_V1 = ("model.feed_forward=relu", "model.tie_embeddings=true")
T5_V1_1 = ("model.feed_forward=gated-gelu", "model.tie_embeddings=false")


def t5_config(*overrides: str):
    from launcher.config import load_config

    return load_config(None, [
        "model.arch=t5", "model.norm=rmsnorm", "model.norm_eps=1e-6", "model.num_layers=2",
        "model.num_decoder_layers=3", "model.hidden_size=64", "model.num_heads=4", "model.kv_channels=8",
        "model.ffn_hidden_size=96", "model.relative_attention_num_buckets=8",
        "model.relative_attention_max_distance=16", f"model.vocab_size={VOCAB}", "data.seq_len=40",
        "train.steps=3", f"train.micro_batch_size={GLOBAL_BATCH}", "optim.lr=3e-3", "optim.warmup_steps=1",
        "optim.min_lr=3e-4", "logging.run_dir=/tmp/parallax-test-runs/t5", *overrides,
    ])


def span_corrupted_batches(cfg):
    """The same global batches at every layout: span-corrupted counting sequences (each row counts up
    by its own stride, so the masked spans are predictable and the loss falls within 3 steps)."""
    from data_pipeline.span_corruption import SpanCorruption

    objective = SpanCorruption(inputs_length=cfg.data.seq_len, noise_density=0.15, mean_noise_span_length=3.0,
                               sentinels=SENTINELS, eod=EOD, pad=PAD, seed=0)
    g = torch.Generator().manual_seed(0)
    shape = (cfg.train.steps, GLOBAL_BATCH, 1)
    start, stride = torch.randint(0, VOCAB, shape, generator=g), torch.randint(1, 4, shape, generator=g)
    words = VOCAB - len(SENTINELS) - 2  # ids 2 .. below the sentinels
    windows = ((start + stride * torch.arange(objective.raw_length)) % words + 2).int().numpy()

    def source(topo):
        m, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
        assert m * accum * topo.dp == GLOBAL_BATCH, "a parity scenario must keep the global batch"
        for step_windows in windows:
            batch = {name: torch.from_numpy(a) for name, a in objective.batch(list(step_windows), GLOBAL_BATCH).items()}
            for j in range(accum):
                first = (j * topo.dp + topo.dp_rank) * m
                yield {name: t[first:first + m] for name, t in batch.items()}
    return source


def t5_outputs(*overrides: str) -> dict:
    """Logits, loss and gradients of one forward/backward, gathered to full (TP=1) shapes."""
    from models.t5 import T5
    from parallel.topology import init_topology

    cfg = t5_config(*overrides)
    topo = init_topology(tp=cfg.parallel.tp)
    torch.manual_seed(cfg.train.seed)
    model = T5(cfg.model, VOCAB)
    batch = next(iter(span_corrupted_batches(cfg)(topo)))
    with torch.no_grad():
        logits = gather_tp(model(batch["input_ids"], batch["decoder_input_ids"]), -1, topo.tp_group)
    loss = model(**batch)
    loss.backward()
    grads = {name: full_shape(p, p.grad, topo.tp_group) for name, p in model.named_parameters()}
    return {"logits": logits, "loss": loss.item(), "grads": grads}


def run_t5_training(*overrides: str) -> list[dict]:

    cfg = t5_config(*overrides)
    return train_records(cfg, batches=span_corrupted_batches(cfg))


def t5_ids_tokenizer():
    """A tokenizer with just T5's special ids, from which an export takes its pad, eos and decoder start."""
    from tokenizers import Tokenizer, models

    from data_pipeline.tokenizer import EOD as EOD_TOKEN, PAD as PAD_TOKEN

    return Tokenizer(models.WordLevel({PAD_TOKEN: PAD, EOD_TOKEN: EOD, "<unk>": 2}, unk_token="<unk>"))


def hugging_face_parity(*variant: str) -> dict:
    """Our T5 and transformers' T5ForConditionalGeneration holding the same random weights (mapped by
    models/huggingface/t5.py), on the same inputs: both logits and both losses."""
    from models.huggingface import to_hf_model
    from models.t5 import T5
    from parallel.topology import init_topology

    cfg = t5_config(*variant).model
    init_topology(tp=1)
    torch.manual_seed(0)
    model = T5(cfg, VOCAB).eval()
    hf = to_hf_model({name: p.detach() for name, p in model.named_parameters()}, cfg, VOCAB, t5_ids_tokenizer())

    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, VOCAB, (3, 48), generator=g)  # longer than max_distance: log-scale buckets
    labels = torch.randint(2, VOCAB, (3, 20), generator=g)
    labels[0, -5:] = -100  # ignored positions
    decoder_input_ids = hf._shift_right(labels)
    with torch.no_grad():
        ours_logits = model(input_ids, decoder_input_ids).transpose(0, 1)
        ours_loss = model(input_ids, decoder_input_ids, labels)
        out = hf(input_ids=input_ids, labels=labels)
    return {"ours_logits": ours_logits, "hf_logits": out.logits, "ours_loss": ours_loss.item(), "hf_loss": out.loss.item()}


# --- one process --------------------------------------------------------------------------------

@scenario(world_size=1)
def t5_attention_masks():
    """The stride of the last dimension of every attention mask the T5's layers pass to SDPA in one forward."""
    from models.t5 import T5, Attention
    from parallel.topology import init_topology

    cfg = t5_config(*T5_V1_1)
    topo = init_topology(tp=1)
    model = T5(cfg.model, VOCAB)
    last_strides = []

    def record(module, args, kwargs):
        mask = kwargs.get("bias", args[1] if len(args) > 1 else None)
        if mask is not None:
            last_strides.append(mask.stride(-1))

    for module in model.modules():
        if isinstance(module, Attention):
            module.register_forward_pre_hook(record, with_kwargs=True)
    batch = next(iter(span_corrupted_batches(cfg)(topo)))
    with torch.no_grad():
        model(batch["input_ids"], batch["decoder_input_ids"])
    return last_strides


@scenario(world_size=1)
def t5_hugging_face_parity():
    return hugging_face_parity(*T5_V1)


@scenario(world_size=1)
def t5_1_1_hugging_face_parity():
    return hugging_face_parity(*T5_V1_1)


@scenario(world_size=1)
def t5_reference_model():
    return t5_outputs(*T5_V1)


@scenario(world_size=1)
def t5_1_1_reference_model():
    return t5_outputs(*T5_V1_1)


@scenario(world_size=1)
def t5_reference_training():
    return run_t5_training(*T5_V1_1, "parallel.zero_stage=0")


@scenario(world_size=1)
def switch_t5_training():
    """Switch-T5: every other feed-forward of both stacks is a top-1 layer of 4 experts."""
    return run_t5_training(*T5_V1_1, "parallel.zero_stage=1", "model.moe.num_experts=4", "model.moe.top_k=1",
                           "model.moe.every=2")


# Switch-T5 at any EP size computes what one process computes when no token is dropped (capacity
# for every token: factor = experts / top_k) and the load-balancing loss, a per-DP-rank quantity, is off.
SWITCH_PARITY = ("model.moe={num_experts: 4, every: 2, top_k: 1, capacity_factor: 4.0, aux_loss_coef: 0.0}",)


@scenario(world_size=1)
def switch_t5_reference_training():
    return run_t5_training(*T5_V1_1, *SWITCH_PARITY, "parallel.zero_stage=0")


@scenario(world_size=1)
def t5_tiny_training():
    """configs/t5-tiny.yaml as shipped, on the built-in corpus through the real data pipeline, for 30 steps."""
    import os

    from launcher.config import load_config

    run_dir = os.path.join(os.environ["PARALLAX_SCENARIO_DIR"], "t5-tiny")
    return train_records(load_config("configs/t5-tiny.yaml", ["train.steps=30", "optim.warmup_steps=10",
                                                      f"logging.run_dir={run_dir}", "checkpoint.resume=none"]))


@scenario(world_size=1)
def t5_exact_resume():
    """A T5 run stopped after step 2 and resumed from its checkpoint (engine, ZeRO-1 states and the
    span-corrupting loader's state), against the same run uninterrupted: (straight, resumed) losses."""
    import os

    from launcher.config import load_config
    from launcher.stopping import StopRequested

    small = ["model.num_layers=1", "model.num_decoder_layers=1", "train.micro_batch_size=2", "train.steps=4",
             "checkpoint.interval=2"]

    def run(name: str, *overrides: str) -> list[dict]:
        run_dir = os.path.join(os.environ["PARALLAX_SCENARIO_DIR"], name)
        return train_records(load_config("configs/t5-tiny.yaml", [*small, f"logging.run_dir={run_dir}", *overrides]))

    straight = run("t5-straight")
    try:
        run("t5-resumed", "train.stop_at_step=2")
    except StopRequested:
        pass
    return [r["loss"] for r in straight if "loss" in r], [r["loss"] for r in run("t5-resumed") if "loss" in r]


# --- two ranks -----------------------------------------------------------------------------------

@scenario(world_size=2)
def t5_tp2_model():
    return t5_outputs(*T5_V1, "parallel.tp=2")


@scenario(world_size=2)
def t5_1_1_tp2_model():
    return t5_outputs(*T5_V1_1, "parallel.tp=2")


@scenario(world_size=2)
def t5_tp2_activation_checkpointing_training():
    return run_t5_training(*T5_V1_1, "parallel.tp=2", "parallel.zero_stage=1", "parallel.activation_checkpointing=true")


@scenario(world_size=2)
def t5_dp2_zero3_training():
    return run_t5_training(*T5_V1_1, f"train.micro_batch_size={GLOBAL_BATCH // 2}", "parallel.zero_stage=3")


@scenario(world_size=2)
def switch_t5_ep2_training():
    return run_t5_training(*T5_V1_1, *SWITCH_PARITY, "parallel.ep=2", "parallel.zero_stage=1",
                           f"train.micro_batch_size={GLOBAL_BATCH // 2}")
