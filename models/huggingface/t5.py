"""Parallax's T5 as Hugging Face's T5ForConditionalGeneration, and back: a `Twin` (models/huggingface/__init__.py).

Both T5 (ReLU feed-forward, output layer tied to the embedding and fed d_model**-0.5 x the decoder
output) and T5.1.1 (gated-GeLU, an output matrix of its own, unscaled) map exactly; Switch-T5 does
not, since T5ForConditionalGeneration's feed-forwards are dense.

The weights differ in layout only:
- Parallax computes keys and values with one matrix whose rows are head by head, [k_0, v_0, k_1, v_1, ...]
  (so contiguous TP slices are whole heads); Hugging Face has separate k and v matrices.
- Parallax's relative position bias belongs to each stack; Hugging Face keeps it in the stack's
  first layer's self-attention, and the other layers borrow it.
- Parallax's one embedding is Hugging Face's `shared`, which both stacks' embed_tokens are tied to.

transformers 5 declares every T5 tied and reads T5.1.1 from config.json's tie_word_embeddings=false
as "do not scale the decoder output" only (T5Config.scale_decoder_outputs); the output matrix is
untied when model.safetensors holds an lm_head.weight that differs from shared.weight, which is
what T5.1.1 is exported as (from_pretrained warns that it does not tie them; that is right).
"""
from __future__ import annotations

from typing import Optional

import torch

from models.config import ModelConfig
from models.huggingface import padded_vocabulary

NAME, ARCH, MODEL_TYPE, AUTO_CLASS = "T5", "t5", "t5", "AutoModelForSeq2SeqLM"
FEED_FORWARDS = ("relu", "gated-gelu")  # T5's and T5.1.1's; Parallax computes no other


def differences(cfg: ModelConfig) -> list[str]:
    if cfg.moe is not None:
        return ["model.moe is set: Switch-T5 has no exact twin, T5ForConditionalGeneration's feed-forwards are dense"]
    return []


def hf_config(cfg: ModelConfig, vocab_size: int, special: dict[str, Optional[int]]):
    """transformers.T5Config of the same model. The decoder starts from the padding token, as Parallax's
    span corruption shifts its targets right (data_pipeline/span_corruption.py)."""
    from transformers import T5Config

    assert not differences(cfg), differences(cfg)
    return T5Config(
        vocab_size=vocab_size, d_model=cfg.hidden_size, d_kv=cfg.head_dim, d_ff=cfg.ffn_size, num_layers=cfg.num_layers,
        num_decoder_layers=cfg.decoder_layers, num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.num_buckets, relative_attention_max_distance=cfg.max_distance,
        dropout_rate=cfg.dropout, layer_norm_epsilon=cfg.norm_eps, feed_forward_proj="gated-gelu" if cfg.gated else "relu",
        tie_word_embeddings=cfg.tied,
        pad_token_id=special["pad"], eos_token_id=special["eos"], decoder_start_token_id=special["pad"],
    )


def model_config(hf) -> ModelConfig:
    """The Parallax T5 of a T5Config; only what Parallax computes exactly is accepted."""
    from models.huggingface import HuggingFaceError

    if hf.feed_forward_proj not in FEED_FORWARDS:
        raise HuggingFaceError(f"config.json: feed_forward_proj={hf.feed_forward_proj!r}; Parallax's T5 has "
                               f"{' or '.join(map(repr, FEED_FORWARDS))}")
    return ModelConfig(
        arch="t5", num_layers=hf.num_layers, num_decoder_layers=hf.num_decoder_layers, hidden_size=hf.d_model,
        num_heads=hf.num_heads, kv_channels=hf.d_kv, ffn_hidden_size=hf.d_ff, vocab_size=hf.vocab_size,
        relative_attention_num_buckets=hf.relative_attention_num_buckets,
        relative_attention_max_distance=hf.relative_attention_max_distance, feed_forward=hf.feed_forward_proj,
        tie_embeddings=hf.scale_decoder_outputs, norm="rmsnorm", norm_eps=hf.layer_norm_epsilon,
        dropout=hf.dropout_rate,
    )


def _names(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(Parallax name, its Hugging Face names) of every tensor but the vocabulary's: one name, or the
    (k, v) pair a fused kv splits into. A Hugging Face block is a list of sub-layers, each with its
    own norm: self-attention, cross-attention (decoder only), feed-forward."""
    names = []
    for stack, layers in (("encoder", cfg.num_layers), ("decoder", cfg.decoder_layers)):
        names += [(f"{stack}.relative_bias.weight",  # the stack's first layer holds it; the others borrow it
                   (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)),
                  (f"{stack}.final_norm.weight", (f"{stack}.final_layer_norm.weight",))]
        attentions = [("self_attn", "SelfAttention")]
        if stack == "decoder":
            attentions.append(("cross_attn", "EncDecAttention"))
        for i in range(layers):
            ours, theirs = f"{stack}.blocks.{i}", f"{stack}.block.{i}.layer"
            for j, (attn, hf_attn) in enumerate(attentions):
                hf = f"{theirs}.{j}.{hf_attn}"
                names += [(f"{ours}.{attn}_norm.weight", (f"{theirs}.{j}.layer_norm.weight",)),
                          (f"{ours}.{attn}.q.weight", (f"{hf}.q.weight",)),
                          (f"{ours}.{attn}.kv.weight", (f"{hf}.k.weight", f"{hf}.v.weight")),
                          (f"{ours}.{attn}.o.weight", (f"{hf}.o.weight",))]
            ff = f"{theirs}.{len(attentions)}"
            wi = [("wi", "wi_0"), ("wi_gate", "wi_1")] if cfg.gated else [("wi", "wi")]
            names += [(f"{ours}.ff_norm.weight", (f"{ff}.layer_norm.weight",)),
                      *[(f"{ours}.ff.{a}.weight", (f"{ff}.DenseReluDense.{b}.weight",)) for a, b in wi],
                      (f"{ours}.ff.wo.weight", (f"{ff}.DenseReluDense.wo.weight",))]
    return names


def _split_kv(kv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [k_0, v_0, k_1, v_1, ...] -> (k, v), each [heads x head_dim, hidden]."""
    k, v = kv.view(cfg.num_heads, 2, cfg.head_dim, cfg.hidden_size).unbind(1)
    return k.reshape(-1, cfg.hidden_size), v.reshape(-1, cfg.hidden_size)


def _fuse_kv(k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    heads = (cfg.num_heads, cfg.head_dim, cfg.hidden_size)
    return torch.stack([k.view(heads), v.view(heads)], dim=1).reshape(-1, cfg.hidden_size)


def _vocabulary(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(Parallax name, Hugging Face name) of the tensors with a row per token; a tied output layer is the embedding."""
    return [("embedding.weight", "shared.weight"), *([("lm_head.weight", "lm_head.weight")] * (not cfg.tied))]


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    """Parallax T5 state dict (full tensors, TP=1 names) -> T5ForConditionalGeneration state dict, true vocabulary."""
    assert not differences(cfg), differences(cfg)
    names, vocabulary = _names(cfg), _vocabulary(cfg)
    unplaced = set(state) - {ours for ours, _ in names} - {ours for ours, _ in vocabulary}
    assert not unplaced, f"Parallax tensors with no T5 place: {sorted(unplaced)}"
    out = {theirs: state[ours][:vocab_size] for ours, theirs in vocabulary}
    for ours, theirs in names:
        out.update(zip(theirs, _split_kv(state[ours], cfg) if len(theirs) == 2 else (state[ours],)))
    return {name: t.contiguous() for name, t in out.items()}


def from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig, padded_vocab_size: int) -> dict[str, torch.Tensor]:
    """The inverse: T5 weights -> a Parallax T5 state dict, the vocabulary padded with zero rows."""
    from models.huggingface import HuggingFaceError

    out = {ours: _fuse_kv(*(hf[n] for n in theirs), cfg) if len(theirs) == 2 else hf[theirs[0]]
           for ours, theirs in _names(cfg)}
    if cfg.tied and "lm_head.weight" in hf and not torch.equal(hf["lm_head.weight"], hf["shared.weight"]):
        raise HuggingFaceError("model.safetensors: lm_head.weight differs from shared.weight, but config.json's "
                               "tie_word_embeddings is true: Parallax's T5 scores a scaled output with its embedding")
    for ours, theirs in _vocabulary(cfg):
        # an lm_head.weight left out is tied to shared by transformers
        out[ours] = padded_vocabulary(hf.get(theirs, hf["shared.weight"]), padded_vocab_size)
    return {name: t.contiguous() for name, t in out.items()}
