"""Issue 16: the GPT, its Llama-style variant and T5 checked from outside. Checkpoints saved at TP=2
and at ZeRO-3 DP=2 (by scenarios_checkpoint.py's two-rank launch, and for the Llama-style GPT by this
module's) are loaded into a one-process Parallax model and exported with models/huggingface/;
transformers' own GPT2LMHeadModel, LlamaForCausalLM or T5ForConditionalGeneration, loaded from the
exported directory, then scores the same batch.
"""
import os
from pathlib import Path

import torch

from tests.distributed import scenarios_t5 as t5
from tests.distributed.harness import scenario
from tests.distributed.scenarios import LLAMA_STYLE, VOCAB, tiny_config
from tests.distributed.scenarios_checkpoint import SAVED_AT, T5_SAVED_AT, layout, saved_path, train_run

BATCH_SHAPE = (3, 32)  # the tiny GPT's whole context, so every learned position is used


def export_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, BATCH_SHAPE, generator=torch.Generator().manual_seed(16))


def parallax_outputs(state: dict, tokens: torch.Tensor, *overrides: str) -> tuple[torch.Tensor, float]:
    """Parallax's own GPT, at TP=1, holding the checkpoint's weights: logits [b, s, padded vocab] of
    `tokens`, and the training loss of `tokens` as a training window (GPT.batch_inputs)."""
    from models.gpt import GPT
    from parallel.topology import init_topology

    cfg = tiny_config(*overrides)
    init_topology(tp=1)
    model = GPT(cfg.model, VOCAB)
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        return model(tokens).transpose(0, 1).contiguous(), model(**GPT.batch_inputs(tokens)).item()


def exported_dir(source: str) -> Path:
    out = Path(os.environ["PARALLAX_SCENARIO_DIR"]) / "exported" / source
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def exported_and_ours(source: str, step: int = SAVED_AT, *overrides: str) -> dict:
    """Export checkpoint `source` through models/huggingface/, reload it with transformers, score the batch both ways."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from models.huggingface import export
    from parallel.checkpoint import read_weights
    from tests.data.corpora import write_id_tokenizer

    state = read_weights(saved_path(source, step))
    cfg = tiny_config(*overrides)
    out = exported_dir(source)
    tokenizer = Tokenizer.from_file(str(write_id_tokenizer(out.parent / "id-tokenizer.json", VOCAB - 3)))
    export(state, cfg.model, VOCAB, tokenizer, out)
    hf = AutoModelForCausalLM.from_pretrained(out)
    hf.eval()
    tokens = export_batch()
    with torch.no_grad():
        theirs = hf(tokens, labels=tokens)  # transformers shifts the labels itself: position t predicts t + 1
    ours, our_loss = parallax_outputs(state, tokens, *overrides)
    return {"ours": ours, "hf": theirs.logits, "ours_loss": our_loss, "hf_loss": theirs.loss.item(),
            "hf_class": type(hf).__name__, "dir": str(out), "tokens": tokens}


@scenario(world_size=1, reads_from=2)
def export_tp2_checkpoint():
    return exported_and_ours("tp2-zero1")


@scenario(world_size=1, reads_from=2)
def export_dp2_zero3_checkpoint():
    return exported_and_ours("dp2-zero3")


LLAMA_STEPS = ("train.steps=2", "checkpoint.interval=2", *LLAMA_STYLE)


@scenario(world_size=2)
def save_llama_style_tp2():
    return train_run("llama-tp2", *LLAMA_STEPS, *layout(2, 1, 1))


@scenario(world_size=2)
def save_llama_style_dp2_zero3():
    return train_run("llama-dp2-zero3", *LLAMA_STEPS, *layout(1, 2, 3))


@scenario(world_size=1, reads_from=2)
def export_llama_style_tp2_checkpoint():
    return exported_and_ours("llama-tp2", 2, *LLAMA_STYLE)


@scenario(world_size=1, reads_from=2)
def export_llama_style_dp2_zero3_checkpoint():
    return exported_and_ours("llama-dp2-zero3", 2, *LLAMA_STYLE)


@scenario(world_size=1)
def imported_llama_logits():
    """A random LlamaForCausalLM saved by transformers, imported into Parallax's GPT at TP=1."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from models.gpt import GPT
    from models.huggingface import import_directory
    from parallel.topology import init_topology
    from tests.test_export import random_hf_model

    directory = random_hf_model("llama", Path(tempfile.mkdtemp()), vocab_size=VOCAB)
    imported = import_directory(directory)
    init_topology(tp=1)
    model = GPT(imported.model, imported.vocab_size).eval()
    model.load_state_dict(imported.state, strict=True)
    tokens = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        ours = model(tokens).transpose(0, 1)[..., :VOCAB]
        hf = AutoModelForCausalLM.from_pretrained(directory).eval()(tokens).logits
    return {"ours": ours, "hf": hf}


def t5_exported_and_ours(source: str, *variant: str) -> dict:
    """Export T5 checkpoint `source`, reload it with transformers' Auto class, and score one span-corrupted
    batch both ways: transformers shifts the labels right itself, from the exported decoder start token."""
    from transformers import AutoModelForSeq2SeqLM

    from models.huggingface import export
    from models.t5 import T5
    from parallel.checkpoint import read_weights
    from parallel.topology import init_topology

    cfg = t5.t5_config(*variant)
    state = read_weights(saved_path(source, T5_SAVED_AT))
    out = exported_dir(source)
    export(state, cfg.model, t5.VOCAB, t5.t5_ids_tokenizer(), out)
    hf = AutoModelForSeq2SeqLM.from_pretrained(out).eval()

    topo = init_topology(tp=1)
    model = T5(cfg.model, t5.VOCAB).eval()
    model.load_state_dict(state, strict=True)
    batch = next(iter(t5.span_corrupted_batches(cfg)(topo)))
    with torch.no_grad():
        theirs = hf(input_ids=batch["input_ids"], labels=batch["labels"])
        ours = model(batch["input_ids"], batch["decoder_input_ids"]).transpose(0, 1).contiguous()
        our_loss = model(**batch).item()
    return {"ours": ours, "hf": theirs.logits, "ours_loss": our_loss, "hf_loss": theirs.loss.item(),
            "hf_class": type(hf).__name__, "lm_head_tied": hf.lm_head.weight is hf.shared.weight,
            "dir": str(out), "batch": batch}


@scenario(world_size=1, reads_from=2)
def export_t5_1_1_tp2_checkpoint():
    return t5_exported_and_ours("t5.1.1-tp2", *t5.T5_V1_1)


@scenario(world_size=1, reads_from=2)
def export_t5_dp2_zero3_checkpoint():
    return t5_exported_and_ours("t5-dp2-zero3", *t5.T5_V1)
