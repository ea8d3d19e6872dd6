"""Issue 27, point 3: BERT under TP=2 with sequence parallelism, DP=2 at ZeRO-3 and TP=2 x DP=2 against one
process, and its checkpoints resumed and resharded (see harness.py; each world size runs in the launch the
GPT's scenarios of that size run in).

The tiny BERT has token types (so the sequence-parallel split of the type ids is exercised) and the
masked-LM head with its vocabulary-parallel bias. Its batches are counting sequences (each row counts up by its
own stride, so a masked token is predictable from its neighbours and the loss falls within 3 steps). Each row
masks its own share of its positions (1 to about 30%), as masked LM's rounding and special tokens make counts
differ between micro-batches: a mean of the micro-batches' means would then differ from one process's mean,
which the training loop's per-token loss (launcher.train.per_token_loss) keeps equal.
"""
import torch

from tests.distributed import scenarios_checkpoint as ckpt
from tests.distributed.harness import scenario
from tests.distributed.scenarios import full_shape, gather_tp, train_records

VOCAB = 512
MASK = VOCAB - 1  # the counting streams stay below it
GLOBAL_BATCH = 4
SEQ_LEN = 32
PRE_LN = ("model.norm_placement=pre",)
SP = ("parallel.tp=2", "parallel.sequence_parallel=true")
# Checkpoints: a short run that saves half-way.
STEPS, SAVED_AT = 4, 2


def bert_config(*overrides: str):
    from launcher.config import load_config

    return load_config(None, [
        "model.arch=bert", "model.num_layers=2", "model.hidden_size=64", "model.num_heads=4",
        "model.ffn_hidden_size=96", f"model.max_seq_len={SEQ_LEN}", f"model.vocab_size={VOCAB}", "model.norm_eps=1e-12",
        "model.norm_placement=post", "model.type_vocab_size=2", f"data.seq_len={SEQ_LEN}", "train.steps=3",
        f"train.micro_batch_size={GLOBAL_BATCH}", "optim.lr=3e-3", "optim.warmup_steps=1", "optim.min_lr=3e-4",
        "logging.run_dir=/tmp/parallax-test-runs/bert", *overrides,
    ])


def masked_batches(cfg):
    """The same global batches at every layout: input_ids with a share of each row's positions (its own) replaced
    by MASK, labels holding the original token there and -100 elsewhere, and token types 0 then 1 from a
    per-row split point (a sentence pair)."""
    g = torch.Generator().manual_seed(0)
    shape = (cfg.train.steps, GLOBAL_BATCH, 1)
    start, stride = torch.randint(0, MASK, shape, generator=g), torch.randint(1, 4, shape, generator=g)
    ids = (start + stride * torch.arange(SEQ_LEN)) % MASK
    masked = torch.rand(ids.shape, generator=g) < 0.3 * torch.rand(shape, generator=g)
    masked[..., 0] = True  # every row scores something
    split = torch.randint(1, SEQ_LEN, shape, generator=g)
    steps = {"input_ids": torch.where(masked, MASK, ids), "labels": torch.where(masked, ids, -100),
             "token_type_ids": (torch.arange(SEQ_LEN) >= split).long()}

    def source(topo):
        m, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
        assert m * accum * topo.dp == GLOBAL_BATCH, "a parity scenario must keep the global batch"
        for step in range(cfg.train.steps):
            for j in range(accum):
                first = (j * topo.dp + topo.dp_rank) * m
                yield {name: t[step, first:first + m] for name, t in steps.items()}
    return source


def bert_outputs(*overrides: str) -> dict:
    """Logits, loss and gradients of one forward/backward, gathered to full (TP=1) shapes."""
    from models.bert import BERT
    from parallel.topology import init_topology

    cfg = bert_config(*overrides)
    topo = init_topology(tp=cfg.parallel.tp)
    torch.manual_seed(cfg.train.seed)
    model = BERT(cfg.model, VOCAB, sequence_parallel=cfg.parallel.sequence_parallel)
    batch = next(iter(masked_batches(cfg)(topo)))
    with torch.no_grad():
        logits = gather_tp(model(batch["input_ids"], token_type_ids=batch["token_type_ids"]), -1, topo.tp_group)
    loss = model(**batch)
    loss.backward()
    grads = {name: full_shape(p, p.grad, topo.tp_group) for name, p in model.named_parameters()}
    return {"logits": logits, "loss": loss.item(), "grads": grads}


def run_bert_training(*overrides: str) -> list[dict]:
    cfg = bert_config(*overrides)
    return train_records(cfg, batches=masked_batches(cfg))


def bert_checkpointed_run(name: str, *overrides: str) -> list[dict]:
    """STEPS steps saving every SAVED_AT, through the checkpoint scenarios' resumable batch source."""
    cfg = bert_config(f"train.steps={STEPS}", f"checkpoint.interval={SAVED_AT}", f"logging.run_dir={ckpt.run_dir(name)}",
                      f"checkpoint.checksum_block_bytes={ckpt.CHECKSUM_BLOCK_BYTES}", *overrides)
    return train_records(cfg, batches=lambda topo: ckpt.ResumableBatches(cfg, topo, masked_batches(cfg)))


def bert_straight_and_resumed(name: str, *overrides: str) -> dict:
    """STEPS steps straight (saving at SAVED_AT), then the same layout again from that checkpoint."""
    return {"straight": bert_checkpointed_run(name, "checkpoint.resume=none", *overrides),
            "resumed": bert_checkpointed_run(f"{name}-resumed", bert_saved(name), *overrides)}


def bert_saved(name: str) -> str:
    return f"checkpoint.resume={ckpt.saved_path(name, SAVED_AT)}"


def bert_reshard(source: str, *overrides: str) -> dict:
    """`source`'s SAVED_AT checkpoint reloaded at this layout: the tensors it holds, and the rest of the run from it."""
    tensors = ckpt.reloaded_tensors(source, *overrides, config=bert_config, step=SAVED_AT)
    return {"checkpoint": str(ckpt.saved_path(source, SAVED_AT)), "tensors": tensors,
            "curve": bert_checkpointed_run(f"{source}-resharded", bert_saved(source), *overrides)}


def layout(tp: int, dp: int, zero: int, *extra: str) -> tuple[str, ...]:
    return (f"parallel.tp={tp}", f"train.micro_batch_size={GLOBAL_BATCH // dp}", f"parallel.zero_stage={zero}", *extra)


# --- one process: the references, and the reshards onto it ----------------------------------------

@scenario(world_size=1)
def bert_reference_model():
    return bert_outputs()


@scenario(world_size=1)
def bert_pre_ln_reference_model():
    return bert_outputs(*PRE_LN)


@scenario(world_size=1)
def bert_reference_training():
    return run_bert_training("parallel.zero_stage=0")


@scenario(world_size=1)
def bert_pre_ln_reference_training():
    return run_bert_training("parallel.zero_stage=0", *PRE_LN)


@scenario(world_size=1)
def bert_grad_accum_training():
    """The global batch in 2 micro-batches of 2 rows, whose masked counts differ."""
    return run_bert_training("parallel.zero_stage=0", f"train.micro_batch_size={GLOBAL_BATCH // 2}",
                             "train.grad_accum=2")


@scenario(world_size=1, reads_from=2)
def bert_reshard_tp2_sp_to_tp1():
    return bert_reshard("bert-tp2-sp", *layout(1, 1, 1))


@scenario(world_size=1, reads_from=2)
def bert_reshard_dp2_zero3_to_tp1():
    return bert_reshard("bert-dp2-zero3", *layout(1, 1, 1))


# --- two ranks -------------------------------------------------------------------------------------

@scenario(world_size=2)
def bert_tp2_model():
    return bert_outputs("parallel.tp=2")


@scenario(world_size=2)
def bert_tp2_sp_model():
    return bert_outputs(*SP)


@scenario(world_size=2)
def bert_pre_ln_tp2_sp_model():
    return bert_outputs(*SP, *PRE_LN)


@scenario(world_size=2)
def bert_tp2_sp_training():
    return run_bert_training(*SP, "parallel.zero_stage=1")


@scenario(world_size=2)
def bert_pre_ln_tp2_sp_training():
    return run_bert_training(*SP, "parallel.zero_stage=1", *PRE_LN)


@scenario(world_size=2)
def bert_dp2_zero3_training():
    return run_bert_training(*layout(1, 2, 3))


@scenario(world_size=2)
def bert_exact_resume_tp2_sp():
    return bert_straight_and_resumed("bert-tp2-sp", *layout(2, 1, 1, "parallel.sequence_parallel=true"))


@scenario(world_size=2)
def bert_exact_resume_dp2_zero3():
    return bert_straight_and_resumed("bert-dp2-zero3", *layout(1, 2, 3))


# --- four ranks ------------------------------------------------------------------------------------

@scenario(world_size=4)
def bert_tp2_sp_dp2_zero3_training():
    return run_bert_training(*layout(2, 2, 3, "parallel.sequence_parallel=true"))


# --- one process, after the two-rank launch: the checkpoints saved at TP=2 with SP and at ZeRO-3, exported ---

def exported_and_ours(source: str) -> dict:
    """`source`'s SAVED_AT checkpoint written as a Hugging Face directory (BertForMaskedLM: the tiny BERT is post-LN
    with token types), reloaded by transformers, and both models' logits of a batch with both token types."""
    import os
    from pathlib import Path

    from transformers import AutoModelForMaskedLM

    from models.bert import BERT
    from models.huggingface import export
    from parallel.checkpoint import read_weights
    from parallel.topology import init_topology

    cfg = bert_config()
    state = read_weights(ckpt.saved_path(source, SAVED_AT))
    out = Path(os.environ["PARALLAX_SCENARIO_DIR"]) / "exported" / source
    export(state, cfg.model, VOCAB, None, out)
    hf = AutoModelForMaskedLM.from_pretrained(out).eval()
    topo = init_topology(tp=1)
    model = BERT(cfg.model, VOCAB).eval()
    model.load_state_dict(state, strict=True)
    batch = next(iter(masked_batches(cfg)(topo)))
    inputs = {"input_ids": batch["input_ids"], "token_type_ids": batch["token_type_ids"]}
    with torch.no_grad():
        return {"ours": model(**inputs).transpose(0, 1), "hf": hf(**inputs).logits, "hf_class": type(hf).__name__}


@scenario(world_size=1, reads_from=2)
def bert_export_tp2_sp_checkpoint():
    return exported_and_ours("bert-tp2-sp")


@scenario(world_size=1, reads_from=2)
def bert_export_dp2_zero3_checkpoint():
    return exported_and_ours("bert-dp2-zero3")
