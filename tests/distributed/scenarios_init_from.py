"""Issue 16, point 4: a run that starts from a Hugging Face directory (model.init_from) computes what
transformers computes with the same weights, at TP=2, TP=2 with sequence parallelism and ZeRO-3 DP=2.

The directory holds a small random GPT2LMHeadModel saved by transformers itself, with a vocabulary
(200 tokens) that Parallax pads to 256, so at TP=2 the second rank's embedding slice holds padding.
"""
import os
from pathlib import Path

import torch
import torch.distributed as dist

from tests.distributed.harness import scenario
from tests.distributed.scenarios import gather_tp, train_records

VOCAB, SEQ_LEN, GLOBAL_BATCH = 200, 32, 4


def write_gpt2_directory(out: Path) -> Path:
    """A random 2-layer GPT-2 as transformers saves it, with an id tokenizer of VOCAB tokens. No dropout,
    so a training step's loss is the eval-mode loss."""
    from tokenizers import Tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from models.huggingface.tokenizer import write_tokenizer
    from tests.data.corpora import write_id_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(4)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(str(out))
    write_tokenizer(Tokenizer.from_file(str(write_id_tokenizer(out.parent / "id-tokenizer.json", VOCAB - 3))), out)
    return out


def windows() -> torch.Tensor:
    """One step's global batch of token windows [GLOBAL_BATCH, SEQ_LEN + 1]."""
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(7))


def init_from_config(directory: Path, *overrides: str):
    from launcher.config import load_config

    run_dir = Path(os.environ["PARALLAX_SCENARIO_DIR"]) / "init-from-runs"
    return load_config(None, [f"model.init_from={directory}", f"data.seq_len={SEQ_LEN}", "train.steps=1",
                              f"logging.run_dir={run_dir}", *overrides])


def first_step(directory: Path, *overrides: str) -> dict:
    """A one-step run from `directory`: its loss, and the logits of the same batch from the model and
    engine that train() builds (build_model, load_full_state, build_engine), gathered to [b, s, vocab]."""
    from models import build_model
    from models.huggingface import import_directory
    from parallel.checkpoint import load_full_state
    from parallel.engine import build_engine
    from parallel.topology import init_topology

    cfg = init_from_config(directory, *overrides)

    def batches(topo):
        m = cfg.train.micro_batch_size
        yield windows()[topo.dp_rank * m:(topo.dp_rank + 1) * m]

    loss = train_records(cfg, batches)[0]["loss"]
    topo = init_topology(tp=cfg.parallel.tp)
    model = build_model(cfg.model, cfg.model.vocab_size, sequence_parallel=cfg.parallel.sequence_parallel)
    load_full_state(model, import_directory(cfg.model.init_from, cfg.model).state, topo)
    engine = build_engine(model, cfg, topo)
    engine.eval()
    with torch.no_grad():
        logits = gather_tp(engine(input_ids=windows()[:, :-1]), -1, topo.tp_group)
    return {"loss": loss, "logits": logits.transpose(0, 1)}


def transformers_outputs(directory: Path) -> dict:
    """GPT-2's logits of the batch, and the loss Parallax must report for it: Parallax scores its padded
    vocabulary too, whose zero embedding rows give logits of 0."""
    from transformers import AutoModelForCausalLM

    from models.config import ModelConfig

    tokens = windows()
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(directory).eval()(tokens[:, :-1]).logits
    padded = torch.nn.functional.pad(logits, (0, ModelConfig().padded_vocab_size(VOCAB) - VOCAB))
    loss = torch.nn.functional.cross_entropy(padded.flatten(0, 1), tokens[:, 1:].flatten())
    return {"logits": logits, "loss": loss.item()}


@scenario(world_size=2)
def init_from_gpt2():
    """One directory, three layouts in turn (each a one-step run and one engine forward)."""
    from parallel.topology import init_topology

    directory = Path(os.environ["PARALLAX_SCENARIO_DIR"]) / "init-from-gpt2"
    init_topology(tp=1)  # joins the process group the barrier below needs
    if dist.get_rank() == 0:
        write_gpt2_directory(directory)
    dist.barrier()
    return {"transformers": transformers_outputs(directory),
            "tp2": first_step(directory, "parallel.tp=2", f"train.micro_batch_size={GLOBAL_BATCH}"),
            "tp2_sp": first_step(directory, "parallel.tp=2", "parallel.sequence_parallel=true",
                                 f"train.micro_batch_size={GLOBAL_BATCH}"),
            "dp2_zero3": first_step(directory, "parallel.zero_stage=3", f"train.micro_batch_size={GLOBAL_BATCH // 2}")}
