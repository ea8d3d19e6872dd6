"""Parallax's Llama-style GPT as Hugging Face's Llama (LlamaForCausalLM), and back: a `Twin`
(models/huggingface/__init__.py).

A GPT is Llama when it has rotary positions, RMSNorm, the SwiGLU MLP and no linear biases; grouped-
query attention and either kind of output layer (untied as in Llama 2 and 3, tied as in Llama 3.2's
small models) map too. The weights differ in layout only:
- Parallax's QKV is one matrix whose rows are grouped by key/value head, [q_g0 ... q_g(r-1), k_g, v_g]
  for each group g (so contiguous TP slices are whole groups); Llama has q_proj, k_proj and v_proj,
  and its query head g x r + j uses key/value head g, as Parallax's does.
- Parallax rotates the pairs of neighbouring features (2i, 2i + 1) of each query and key head, as
  Meta's original code does; transformers rotates the pairs (i, i + head_dim / 2). The same rotation
  of permuted features: each q and k head's rows are permuted, as transformers' own Meta converter does.
"""
from __future__ import annotations

from typing import Optional

import torch

from models.config import ModelConfig
from models.huggingface import padded_vocabulary

NAME, ARCH, MODEL_TYPE, AUTO_CLASS = "Llama", "gpt", "llama", "AutoModelForCausalLM"


def differences(cfg: ModelConfig) -> list[str]:
    wanted = [
        (cfg.position_embedding == "rotary", f"model.position_embedding={cfg.position_embedding}: Llama's positions are rotary"),
        (cfg.norm == "rmsnorm", f"model.norm={cfg.norm}: Llama normalises with RMSNorm"),
        (cfg.swiglu, f"model.mlp={cfg.mlp or 'gelu'}: Llama's MLP is SwiGLU"),
        (not cfg.biased, "model.linear_bias is not false: Llama's linear layers have no biases"),
        (cfg.moe is None, "model.moe is set: Llama has a dense MLP in every block"),
    ]
    return [problem for holds, problem in wanted if not holds]


def hf_config(cfg: ModelConfig, vocab_size: int, special: dict[str, Optional[int]]):
    """transformers.LlamaConfig of the same model."""
    from transformers import LlamaConfig

    assert not differences(cfg), differences(cfg)
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tied,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base},
        attention_bias=False, mlp_bias=False, attention_dropout=cfg.dropout,
        bos_token_id=special["bos"], eos_token_id=special["eos"], pad_token_id=special["pad"],
    )


def model_config(hf) -> ModelConfig:
    """The Parallax GPT of a LlamaConfig; only what Parallax computes exactly is accepted."""
    from models.huggingface import HuggingFaceError

    rope = hf.rope_parameters or {}
    refused = [
        (hf.hidden_act != "silu", f"hidden_act={hf.hidden_act!r}; Parallax's SwiGLU gates with 'silu'"),
        (hf.attention_bias or hf.mlp_bias, "attention_bias/mlp_bias is true; Parallax's Llama has no linear biases"),
        (rope.get("rope_type", "default") != "default",
         f"rope_parameters.rope_type={rope.get('rope_type')!r}; Parallax's rotary embedding is unscaled ('default')"),
        (hf.head_dim != hf.hidden_size // hf.num_attention_heads,
         f"head_dim={hf.head_dim}; Parallax's heads are hidden_size / num_attention_heads = "
         f"{hf.hidden_size // hf.num_attention_heads} wide"),
    ]
    for refuse, problem in refused:
        if refuse:
            raise HuggingFaceError(f"config.json: {problem}")
    return ModelConfig(
        arch="gpt", num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads, ffn_hidden_size=hf.intermediate_size, max_seq_len=hf.max_position_embeddings,
        vocab_size=hf.vocab_size, position_embedding="rotary", rotary_base=rope.get("rope_theta", 10000.0),
        norm="rmsnorm", norm_eps=hf.rms_norm_eps, mlp="swiglu", linear_bias=False, tie_embeddings=hf.tie_word_embeddings,
        dropout=hf.attention_dropout, init_std=hf.initializer_range,
    )


def _neighbour_pairs_to_halves(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Each head's rows (2i, 2i + 1) -> (i, i + head_dim / 2): Parallax's rotary layout to transformers'."""
    return rows.reshape(-1, head_dim // 2, 2, rows.shape[-1]).transpose(1, 2).reshape(rows.shape)


def _halves_to_neighbour_pairs(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    return rows.reshape(-1, 2, head_dim // 2, rows.shape[-1]).transpose(1, 2).reshape(rows.shape)


def _split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Parallax's QKV rows, grouped by key/value head -> q, k, v (all heads each), in Parallax's rotary layout."""
    head_dim, group = cfg.hidden_size // cfg.num_heads, cfg.num_heads // cfg.kv_heads
    groups = qkv.reshape(cfg.kv_heads, group + 2, head_dim, cfg.hidden_size)
    q, k, v = groups[:, :group], groups[:, group], groups[:, group + 1]
    return (q.reshape(-1, cfg.hidden_size), k.reshape(-1, cfg.hidden_size), v.reshape(-1, cfg.hidden_size))


def _join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    head_dim, group = cfg.hidden_size // cfg.num_heads, cfg.num_heads // cfg.kv_heads
    per_group = lambda t, heads: t.reshape(cfg.kv_heads, heads, head_dim, cfg.hidden_size)  # noqa: E731
    return torch.cat([per_group(q, group), per_group(k, 1), per_group(v, 1)], dim=1).reshape(-1, cfg.hidden_size)


def _names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(Parallax name, Llama name) of every tensor mapped as it is: all but the QKV and the vocabulary's."""
    names = [("final_norm.weight", "model.norm.weight")]
    for i in range(cfg.num_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        names += [(ours + a, theirs + b) for a, b in (
            ("attn_norm.weight", "input_layernorm.weight"), ("attn.proj.weight", "self_attn.o_proj.weight"),
            ("mlp_norm.weight", "post_attention_layernorm.weight"), ("mlp.fc_gate.weight", "mlp.gate_proj.weight"),
            ("mlp.fc_in.weight", "mlp.up_proj.weight"), ("mlp.fc_out.weight", "mlp.down_proj.weight"))]
    return names


def _vocabulary(cfg: ModelConfig) -> list[tuple[str, str]]:
    return [("embedding.weight", "model.embed_tokens.weight")] + ([] if cfg.tied else [("output_layer.weight", "lm_head.weight")])


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    """Parallax GPT state dict (full tensors, TP=1 names) -> LlamaForCausalLM state dict."""
    assert not differences(cfg), differences(cfg)
    head_dim = cfg.hidden_size // cfg.num_heads
    unplaced = set(state) - {ours for ours, _ in [*_names(cfg), *_vocabulary(cfg)]} - {
        f"blocks.{i}.attn.qkv.weight" for i in range(cfg.num_layers)}
    assert not unplaced, f"Parallax tensors with no Llama place: {sorted(unplaced)}"
    out = {theirs: state[ours] for ours, theirs in _names(cfg)}
    out |= {theirs: state[ours][:vocab_size] for ours, theirs in _vocabulary(cfg)}
    for i in range(cfg.num_layers):
        q, k, v = _split_qkv(state[f"blocks.{i}.attn.qkv.weight"], cfg)
        attention = f"model.layers.{i}.self_attn."
        out[attention + "q_proj.weight"] = _neighbour_pairs_to_halves(q, head_dim)
        out[attention + "k_proj.weight"] = _neighbour_pairs_to_halves(k, head_dim)
        out[attention + "v_proj.weight"] = v
    return {name: t.contiguous() for name, t in out.items()}


def from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig, padded_vocab_size: int) -> dict[str, torch.Tensor]:
    """The inverse: Llama weights -> a Parallax GPT state dict, the vocabulary padded with zero rows."""
    head_dim = cfg.hidden_size // cfg.num_heads
    out = {ours: hf[theirs] for ours, theirs in _names(cfg)}
    out |= {ours: padded_vocabulary(hf[theirs], padded_vocab_size) for ours, theirs in _vocabulary(cfg)}
    for i in range(cfg.num_layers):
        attention = f"model.layers.{i}.self_attn."
        q = _halves_to_neighbour_pairs(hf[attention + "q_proj.weight"], head_dim)
        k = _halves_to_neighbour_pairs(hf[attention + "k_proj.weight"], head_dim)
        out[f"blocks.{i}.attn.qkv.weight"] = _join_qkv(q, k, hf[attention + "v_proj.weight"], cfg)
    return {name: t.contiguous() for name, t in out.items()}
