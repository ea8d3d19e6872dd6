"""Parallax's GPT as Hugging Face's GPT-2 (GPT2LMHeadModel), and back: a `Twin` (models/huggingface/__init__.py).

Only one Parallax GPT is GPT-2: learned positions, LayerNorm, the dense MLP with GeLU's tanh
approximation (GPT-2's `gelu_new`, which Parallax always uses), biases everywhere and the output
layer tied to the embedding. `differences` names what else a config has; nothing is approximated.

The weights differ in layout only:
- Parallax's QKV rows are grouped head by head, [q_0, k_0, v_0, q_1, k_1, v_1, ...] (so contiguous TP
  slices are whole heads); GPT-2's c_attn is [all q | all k | all v].
- GPT-2's linear layers are Conv1D, which stores the weight as [in, out]: torch's Linear transposed.
"""
from __future__ import annotations

from typing import Optional

import torch

from models.config import ModelConfig
from models.huggingface import padded_vocabulary

NAME, ARCH, MODEL_TYPE, AUTO_CLASS = "GPT-2", "gpt", "gpt2", "AutoModelForCausalLM"


def differences(cfg: ModelConfig) -> list[str]:
    wanted = [
        (cfg.position_embedding == "learned", f"model.position_embedding={cfg.position_embedding}: GPT-2 has learned positions"),
        (cfg.norm == "layernorm", f"model.norm={cfg.norm}: GPT-2 normalises with LayerNorm"),
        (cfg.moe is None, "model.moe is set: GPT-2 has a dense MLP in every block"),
        (not cfg.swiglu, "model.mlp=swiglu: GPT-2's MLP is GeLU"),
        (cfg.kv_heads == cfg.num_heads, f"model.num_kv_heads={cfg.kv_heads}: GPT-2 has a key/value head per query head"),
        (cfg.biased, "model.linear_bias=false: GPT-2's linear layers have biases"),
        (cfg.tied, "model.tie_embeddings=false: GPT-2's output layer is the embedding"),
    ]
    return [problem for holds, problem in wanted if not holds]


def hf_config(cfg: ModelConfig, vocab_size: int, special: dict[str, Optional[int]]):
    """transformers.GPT2Config of the same model; dropout is the run's (it is off in eval mode anyway)."""
    from transformers import GPT2Config

    assert not differences(cfg), differences(cfg)
    return GPT2Config(
        vocab_size=vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
        n_head=cfg.num_heads, n_inner=cfg.ffn_size, activation_function="gelu_new",
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False, tie_word_embeddings=True,
        bos_token_id=special["bos"], eos_token_id=special["eos"], pad_token_id=special["pad"],
    )


def model_config(hf) -> ModelConfig:
    """The Parallax GPT of a GPT2Config; only what Parallax computes exactly is accepted."""
    from models.huggingface import HuggingFaceError

    differs = {"activation_function": (hf.activation_function, "gelu_new"),
               "scale_attn_weights": (hf.scale_attn_weights, True),
               "scale_attn_by_inverse_layer_idx": (hf.scale_attn_by_inverse_layer_idx, False),
               "reorder_and_upcast_attn": (hf.reorder_and_upcast_attn, False),
               "tie_word_embeddings": (hf.tie_word_embeddings, True)}
    for field, (value, needed) in differs.items():
        if value != needed:
            raise HuggingFaceError(f"config.json: {field}={value!r}; Parallax's GPT-2 has {needed!r}")
    return ModelConfig(
        arch="gpt", num_layers=hf.n_layer, hidden_size=hf.n_embd, num_heads=hf.n_head,
        ffn_hidden_size=hf.n_inner or 4 * hf.n_embd, max_seq_len=hf.n_positions, vocab_size=hf.vocab_size,
        position_embedding="learned", norm="layernorm", norm_eps=hf.layer_norm_epsilon, dropout=hf.resid_pdrop,
        init_std=hf.initializer_range,
    )


def _heads_to_blocks(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """QKV rows [q_0, k_0, v_0, q_1, ...] -> [q_0, q_1, ... | k_0, ... | v_0, ...] (weight or bias)."""
    return t.reshape(num_heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _blocks_to_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    return t.reshape(3, num_heads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


# How each Parallax tensor becomes a GPT-2 one: as it is, transposed (Conv1D), or with its QKV rows regrouped.
SAME, TRANSPOSED, QKV_WEIGHT, QKV_BIAS = "same", "transposed", "qkv weight", "qkv bias"


def _names(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    """(Parallax name, GPT-2 name, how) of every tensor but the embedding, which the vocabulary sizes set."""
    names = [("position_embedding.weight", "transformer.wpe.weight", SAME),
             ("final_norm.weight", "transformer.ln_f.weight", SAME),
             ("final_norm.bias", "transformer.ln_f.bias", SAME)]
    for i in range(cfg.num_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        names += [(ours + a, theirs + b, how) for a, b, how in (
            ("attn_norm.weight", "ln_1.weight", SAME), ("attn_norm.bias", "ln_1.bias", SAME),
            ("attn.qkv.weight", "attn.c_attn.weight", QKV_WEIGHT), ("attn.qkv.bias", "attn.c_attn.bias", QKV_BIAS),
            ("attn.proj.weight", "attn.c_proj.weight", TRANSPOSED), ("attn.proj.bias", "attn.c_proj.bias", SAME),
            ("mlp_norm.weight", "ln_2.weight", SAME), ("mlp_norm.bias", "ln_2.bias", SAME),
            ("mlp.fc_in.weight", "mlp.c_fc.weight", TRANSPOSED), ("mlp.fc_in.bias", "mlp.c_fc.bias", SAME),
            ("mlp.fc_out.weight", "mlp.c_proj.weight", TRANSPOSED), ("mlp.fc_out.bias", "mlp.c_proj.bias", SAME))]
    return names


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    """Parallax GPT state dict (full tensors, TP=1 names) -> GPT2LMHeadModel state dict (lm_head tied to wte)."""
    assert not differences(cfg), differences(cfg)
    convert = {SAME: lambda t: t, TRANSPOSED: lambda t: t.t(),
               QKV_WEIGHT: lambda t: _heads_to_blocks(t, cfg.num_heads).t(),
               QKV_BIAS: lambda t: _heads_to_blocks(t, cfg.num_heads)}
    names = _names(cfg)
    unplaced = set(state) - {"embedding.weight"} - {ours for ours, _, _ in names}
    assert not unplaced, f"Parallax tensors with no GPT-2 place: {sorted(unplaced)}"
    out = {theirs: convert[how](state[ours]) for ours, theirs, how in names}
    out["transformer.wte.weight"] = state["embedding.weight"][:vocab_size]
    return {name: t.contiguous() for name, t in out.items()}


def from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig, padded_vocab_size: int) -> dict[str, torch.Tensor]:
    """The inverse: GPT-2 weights -> a Parallax GPT state dict, the embedding padded with zero rows."""
    convert = {SAME: lambda t: t, TRANSPOSED: lambda t: t.t(),
               QKV_WEIGHT: lambda t: _blocks_to_heads(t.t(), cfg.num_heads),
               QKV_BIAS: lambda t: _blocks_to_heads(t, cfg.num_heads)}
    out = {ours: convert[how](hf[theirs]) for ours, theirs, how in _names(cfg)}
    out["embedding.weight"] = padded_vocabulary(hf["transformer.wte.weight"], padded_vocab_size)
    return {name: t.contiguous() for name, t in out.items()}
