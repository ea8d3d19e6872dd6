"""Issue 16: a run that starts from a Hugging Face directory (model.init_from) computes what
transformers computes with the same weights, for every architecture and layout: GPT-2 and Llama at
TP=2, TP=2 with sequence parallelism and ZeRO-3 DP=2, T5.1.1 (no sequence parallelism) at TP=2 and
ZeRO-3 DP=2, BERT and RoBERTa (issue 27) at TP=2 with sequence parallelism and ZeRO-3 DP=2.

Each directory is a small random model saved by transformers itself, with a vocabulary (200 tokens)
that Parallax pads to 256, so at TP=2 the second rank's embedding and output slices hold padding.
The Llama is grouped-query (4 heads, 2 key/value heads: TP=2 gives each rank one group) and untied;
the T5.1.1 has an output matrix of its own.
"""
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from tests.distributed.harness import scenario
from tests.distributed.scenarios import gather_tp, train_records

VOCAB, SEQ_LEN, GLOBAL_BATCH = 200, 16, 4
EOD, PAD = 0, 1  # the id tokenizer's (tests/data/corpora.py); T5's decoder starts from PAD, as span corruption does
TP2 = ("parallel.tp=2", f"train.micro_batch_size={GLOBAL_BATCH}")
TP2_SP = (*TP2, "parallel.sequence_parallel=true")
DP2_ZERO3 = ("parallel.zero_stage=3", f"train.micro_batch_size={GLOBAL_BATCH // 2}")
GPT_LAYOUTS = {"tp2": TP2, "tp2_sp": TP2_SP, "dp2_zero3": DP2_ZERO3}
T5_LAYOUTS = {"tp2": TP2, "dp2_zero3": DP2_ZERO3}  # T5 has no sequence parallelism
ENCODER_LAYOUTS = {"tp2_sp": TP2_SP, "dp2_zero3": DP2_ZERO3}  # plain TP=2 equals one process: scenarios_bert.py
Batch = torch.Tensor | dict[str, torch.Tensor]


def _save(model, out: Path) -> Path:
    """`model` as transformers saves it, with an id tokenizer of VOCAB tokens (EOD, PAD, <unk>, then words)."""
    from tokenizers import Tokenizer

    from models.huggingface.tokenizer import write_tokenizer
    from tests.data.corpora import write_id_tokenizer

    model.save_pretrained(str(out))
    # Next to the directory under a name of its own: the checkpoint scenarios' data tokenizer is
    # $PARALLAX_SCENARIO_DIR/id-tokenizer.json, and a run resuming from them must find it unchanged.
    ids = write_id_tokenizer(out.parent / f"{out.name}-id-tokenizer.json", VOCAB - 3)
    write_tokenizer(Tokenizer.from_file(str(ids)), out)
    return out


def write_gpt2_directory(out: Path) -> Path:
    """A random 2-layer GPT-2. No dropout, so a training step's loss is the eval-mode loss."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(4)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOD, eos_token_id=EOD)
    return _save(GPT2LMHeadModel(config), out)


def write_llama_directory(out: Path) -> Path:
    """A random 2-layer Llama 3 style model: grouped-query, untied, rope_theta 500000. Its weights are
    drawn 5x wider than Llama's default, so its logits are a few units: at the default the attention
    is nearly uniform and every logit near 0, and a wrong weight would move them by less than 1e-5."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
                         initializer_range=0.1, bos_token_id=EOD, eos_token_id=EOD)
    return _save(LlamaForCausalLM(config), out)


def write_t5_directory(out: Path) -> Path:
    """A random T5.1.1 whose output matrix is its own (transformers 5 builds every T5 tied), the decoder
    starting from the tokenizer's padding token. The encoder's input is longer than
    relative_attention_max_distance, so the bias's log-scale buckets are exercised; the output matrix is
    narrower than T5's default so the logits are a few units, and 1e-5 a few float32 steps of them."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(5)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=8,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                      pad_token_id=PAD, eos_token_id=EOD, decoder_start_token_id=PAD)
    model = T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(0.2 * torch.randn_like(model.lm_head.weight))
    return _save(model, out)


def encoder_directory(kind: str) -> Callable[[Path], Path]:
    """Writes a random BERT or RoBERTa (tests/test_export_bert.py's, mask token [MASK], vocabulary 401, which
    Parallax pads to 512) with no dropout, so a training step's loss is the eval-mode loss."""
    def write(out: Path) -> Path:
        from tests.test_export_bert import _hf_directory

        return _hf_directory(out, kind, mask="[MASK]", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return write


def masked_words() -> dict[str, torch.Tensor]:
    """An encoder's global batch: words (ids 4-400, after the specials; no padding id, so RoBERTa's positions
    are its plain offset ones), a fifth of them replaced by the mask token (id 3) and scored."""
    g = torch.Generator().manual_seed(7)
    words = torch.randint(4, 401, (GLOBAL_BATCH, SEQ_LEN), generator=g)
    masked = torch.rand(words.shape, generator=g) < 0.2
    masked[:, 0] = True
    return {"input_ids": torch.where(masked, 3, words), "labels": torch.where(masked, words, -100)}


def windows() -> torch.Tensor:
    """A GPT's global batch of token windows [GLOBAL_BATCH, SEQ_LEN + 1]."""
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(7))


def span_corrupted() -> dict[str, torch.Tensor]:
    """A T5's global batch: random windows span-corrupted as the run's data pipeline would (data.span_corruption's
    defaults, T5's sentinels from the top of the vocabulary)."""
    from data_pipeline.config import SpanCorruptionConfig
    from data_pipeline.span_corruption import SpanCorruption

    noise = SpanCorruptionConfig()
    objective = SpanCorruption(inputs_length=SEQ_LEN, noise_density=noise.noise_density,
                               mean_noise_span_length=noise.mean_noise_span_length,
                               sentinels=tuple(range(VOCAB - 1, VOCAB - 101, -1)), eod=EOD, pad=PAD, seed=0)
    words = torch.randint(3, VOCAB - 100, (GLOBAL_BATCH, objective.raw_length),  # below the sentinels
                          generator=torch.Generator().manual_seed(7))
    return {name: torch.from_numpy(a) for name, a in objective.batch(list(words.numpy()), GLOBAL_BATCH).items()}


def rows(batch: Batch, start: int, stop: int) -> Batch:
    if isinstance(batch, dict):
        return {name: t[start:stop] for name, t in batch.items()}
    return batch[start:stop]


def without_labels(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward's arguments that give logits; a new dict, since a T5's batch_inputs is the batch itself."""
    return {name: t for name, t in inputs.items() if name != "labels"}


def init_from_config(directory: Path, *overrides: str):
    from launcher.config import load_config

    run_dir = Path(os.environ["PARALLAX_SCENARIO_DIR"]) / "init-from-runs"
    return load_config(None, [f"model.init_from={directory}", f"data.seq_len={SEQ_LEN}", "train.steps=1",
                              f"logging.run_dir={run_dir}", *overrides])


def first_step(directory: Path, batch: Batch, *overrides: str) -> dict:
    """A one-step run from `directory` on `batch`: its loss, and the logits of the same batch from the
    model and engine that train() builds (build_model_and_engine), gathered to [b, s, padded vocab]."""
    from launcher.train import build_model_and_engine
    from parallel.topology import init_topology

    cfg = init_from_config(directory, *overrides)

    def batches(topo):
        m = cfg.train.micro_batch_size
        yield rows(batch, topo.dp_rank * m, (topo.dp_rank + 1) * m)

    loss = train_records(cfg, batches)[0]["loss"]
    topo = init_topology(tp=cfg.parallel.tp)
    model, engine = build_model_and_engine(cfg, topo, cfg.model.vocab_size, init_from=cfg.model.init_from)
    engine.eval()
    with torch.no_grad():
        logits = gather_tp(engine(**without_labels(model.batch_inputs(batch))), -1, topo.tp_group)
    return {"loss": loss, "logits": logits.transpose(0, 1)}


def transformers_outputs(directory: Path, batch: Batch) -> dict:
    """transformers' logits of the batch, and the loss Parallax must report for it: Parallax scores its
    padded vocabulary too, whose zero rows give logits of 0."""
    import transformers

    from models import model_class
    from models.huggingface import read_config

    cfg = init_from_config(directory).model
    inputs = model_class(cfg).batch_inputs(batch)  # the forward's arguments are named as transformers names them
    model = getattr(transformers, read_config(directory)[0].AUTO_CLASS).from_pretrained(directory).eval()
    with torch.no_grad():
        logits = model(**without_labels(inputs)).logits
    vocab = model.config.vocab_size
    padded = torch.nn.functional.pad(logits, (0, cfg.padded_vocab_size(vocab) - vocab))
    loss = torch.nn.functional.cross_entropy(padded.flatten(0, 1), inputs["labels"].flatten())
    return {"logits": logits, "loss": loss.item()}


def init_from_runs(name: str, write: Callable[[Path], Path], batch: Batch, layouts: dict[str, tuple[str, ...]]) -> dict:
    """One directory written by `write`, transformers' outputs on `batch`, and a one-step run from the
    directory at each of `layouts` (name -> overrides) in turn, each a short training run and one engine forward."""
    from parallel.topology import init_topology

    directory = Path(os.environ["PARALLAX_SCENARIO_DIR"]) / name
    init_topology(tp=1)  # joins the process group the barrier below needs
    if dist.get_rank() == 0:
        write(directory)
    dist.barrier()
    return {"transformers": transformers_outputs(directory, batch),
            **{layout: first_step(directory, batch, *overrides) for layout, overrides in layouts.items()}}


@scenario(world_size=2)
def init_from_gpt2():
    return init_from_runs("init-from-gpt2", write_gpt2_directory, windows(), GPT_LAYOUTS)


@scenario(world_size=2)
def init_from_llama():
    return init_from_runs("init-from-llama", write_llama_directory, windows(), GPT_LAYOUTS)


@scenario(world_size=2)
def init_from_t5():
    return init_from_runs("init-from-t5", write_t5_directory, span_corrupted(), T5_LAYOUTS)


@scenario(world_size=2)
def init_from_bert():
    return init_from_runs("init-from-bert", encoder_directory("bert"), masked_words(), ENCODER_LAYOUTS)


@scenario(world_size=2)
def init_from_roberta():
    return init_from_runs("init-from-roberta", encoder_directory("roberta"), masked_words(), ENCODER_LAYOUTS)


@scenario(world_size=2)
def init_from_gpt2_at_pp2():
    """Issue 25: at PP=2 each stage fills only its own layers from the directory, and the last stage its copy
    of the tied embedding; the first step's loss (2 micro-batches of 2 through the stages) is transformers'."""
    from parallel.topology import init_topology

    directory = Path(os.environ["PARALLAX_SCENARIO_DIR"]) / "init-from-gpt2-pp2"
    init_topology(tp=1)  # joins the process group the barrier below needs
    if dist.get_rank() == 0:
        write_gpt2_directory(directory)
    dist.barrier()
    cfg = init_from_config(directory, "parallel.pp=2", f"train.micro_batch_size={GLOBAL_BATCH // 2}",
                           "train.grad_accum=2")
    batch = windows()
    return {"transformers": transformers_outputs(directory, batch),
            "loss": train_records(cfg, lambda topo: iter(batch.split(GLOBAL_BATCH // 2)))[0]["loss"]}
