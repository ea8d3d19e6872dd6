"""Parallax's BERT as Hugging Face's BertForMaskedLM, RobertaForMaskedLM and MegatronBertForMaskedLM, and back:
three `Twin`s (models/huggingface/__init__.py) of one mapping.

The three share a body and differ in where the LayerNorms sit and where positions start:
- BERT: post-LN with a LayerNorm on the embeddings, positions from 0;
- RoBERTa: the same body; its positions start after the padding id (transformers numbers a token
  padding_idx + 1 + its index, and gives padding the padding id's row), so model.position_offset is
  pad_token_id + 1 and the table has max_seq_len + offset rows (514 for 512). Its inputs must then not
  contain the padding id, and the tokenizer's padding token must be that id;
- Megatron-BERT: pre-LN, no embedding LayerNorm, one after the last layer (encoder.ln).
Every one has the exact (erf) GeLU, biases everywhere and the output layer tied to the word embedding, with
a bias of its own (cls.predictions.bias, which decoder.bias is tied to).

The weights differ in layout only: Parallax's QKV rows are grouped head by head, [q_0, k_0, v_0, q_1, ...],
so contiguous TP slices are whole heads; transformers has separate query, key and value layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from models.config import ModelConfig
from models.huggingface import HuggingFaceError, padded_vocabulary


@dataclass(frozen=True)
class EncoderTwin:
    NAME: str
    MODEL_TYPE: str
    CONFIG_CLASS: str
    prefix: str  # the body's module name: "bert." or "roberta."
    head: tuple[str, str, str, str]  # the head's dense, LayerNorm and bias, and the tied decoder
    pre_norm: bool
    shifted_positions: bool  # RoBERTa's: from pad_token_id + 1
    ARCH: str = "bert"
    AUTO_CLASS: str = "AutoModelForMaskedLM"

    def differences(self, cfg: ModelConfig) -> list[str]:
        placement = "pre" if self.pre_norm else "post"
        wanted = [
            (cfg.pre_norm == self.pre_norm, f"model.norm_placement={cfg.norm_placement}: {self.NAME} is {placement}-LN"),
            (cfg.biased, f"model.linear_bias=false: {self.NAME}'s linear layers have biases"),
            (cfg.token_types > 0, f"model.type_vocab_size=0: {self.NAME} has a token-type embedding (RoBERTa's has 1 row)"),
            ((cfg.first_position > 0) == self.shifted_positions,
             f"model.position_offset={cfg.first_position}: {self.NAME}'s positions start "
             + ("after its padding id (1 or more)" if self.shifted_positions else "at 0")),
        ]
        return [problem for holds, problem in wanted if not holds]

    def hf_config(self, cfg: ModelConfig, vocab_size: int, special: dict[str, Optional[int]]):
        """The transformers config of the same model; dropout is the run's (it is off in eval mode anyway)."""
        import transformers

        assert not self.differences(cfg), self.differences(cfg)
        pad = special["pad"]
        if self.shifted_positions and pad != cfg.first_position - 1:
            raise HuggingFaceError(
                f"model.position_offset={cfg.first_position}: {self.NAME} numbers positions from its padding id + 1, "
                f"but the tokenizer's padding token (data.pad_token) is id {pad}; use a tokenizer whose padding id is "
                f"{cfg.first_position - 1}")
        return getattr(transformers, self.CONFIG_CLASS)(
            vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, intermediate_size=cfg.ffn_size, hidden_act="gelu",
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
            max_position_embeddings=cfg.first_position + cfg.max_seq_len, type_vocab_size=cfg.token_types,
            initializer_range=cfg.init_std, layer_norm_eps=cfg.norm_eps, tie_word_embeddings=True,
            pad_token_id=pad, bos_token_id=special["bos"], eos_token_id=special["eos"],
        )

    def model_config(self, hf) -> ModelConfig:
        """The Parallax BERT of a transformers config; only what Parallax computes exactly is accepted."""
        differs = {"hidden_act": (hf.hidden_act, "gelu"), "is_decoder": (hf.is_decoder, False),
                   "add_cross_attention": (hf.add_cross_attention, False),
                   "tie_word_embeddings": (getattr(hf, "tie_word_embeddings", True), True),
                   "position_embedding_type": (getattr(hf, "position_embedding_type", "absolute"), "absolute"),
                   "attention_probs_dropout_prob": (hf.attention_probs_dropout_prob, hf.hidden_dropout_prob)}
        for field, (value, needed) in differs.items():
            if value != needed:
                raise HuggingFaceError(f"config.json: {field}={value!r}; Parallax's {self.NAME} has {needed!r}")
        offset = hf.pad_token_id + 1 if self.shifted_positions else 0
        return ModelConfig(
            arch="bert", num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size,
            num_heads=hf.num_attention_heads, ffn_hidden_size=hf.intermediate_size,
            max_seq_len=hf.max_position_embeddings - offset, vocab_size=hf.vocab_size, norm="layernorm",
            norm_eps=hf.layer_norm_eps, dropout=hf.hidden_dropout_prob, init_std=hf.initializer_range,
            norm_placement="pre" if self.pre_norm else "post", type_vocab_size=hf.type_vocab_size,
            position_offset=offset,
        )

    def _names(self, cfg: ModelConfig) -> list[tuple[str, str]]:
        """(Parallax name, transformers name) of every tensor that maps one to one."""
        body, (dense, norm, _, _) = self.prefix, self.head
        names = [("position_embedding.weight", body + "embeddings.position_embeddings.weight"),
                 ("token_type_embedding.weight", body + "embeddings.token_type_embeddings.weight"),
                 ("head.dense.weight", dense + ".weight"), ("head.dense.bias", dense + ".bias"),
                 ("head.norm.weight", norm + ".weight"), ("head.norm.bias", norm + ".bias")]
        if self.pre_norm:
            names += [("final_norm.weight", body + "encoder.ln.weight"), ("final_norm.bias", body + "encoder.ln.bias")]
        else:
            names += [("embedding_norm.weight", body + "embeddings.LayerNorm.weight"),
                      ("embedding_norm.bias", body + "embeddings.LayerNorm.bias")]
        attn_norm, mlp_norm = (("attention.ln", "ln") if self.pre_norm
                               else ("attention.output.LayerNorm", "output.LayerNorm"))
        for i in range(cfg.num_layers):
            ours, theirs = f"blocks.{i}.", f"{body}encoder.layer.{i}."
            names += [(ours + a + suffix, theirs + b + suffix) for a, b in (
                ("attn_norm", attn_norm), ("attn.proj", "attention.output.dense"), ("mlp_norm", mlp_norm),
                ("mlp.fc_in", "intermediate.dense"), ("mlp.fc_out", "output.dense"),
            ) for suffix in (".weight", ".bias")]
        return names

    def _qkv_names(self, cfg: ModelConfig) -> list[tuple[str, str]]:
        """(Parallax QKV tensor, the transformers attention prefix it splits into)."""
        return [(f"blocks.{i}.attn.qkv.{kind}", f"{self.prefix}encoder.layer.{i}.attention.self.")
                for i in range(cfg.num_layers) for kind in ("weight", "bias")]

    def to_hf(self, state: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int) -> dict[str, torch.Tensor]:
        """Parallax BERT state dict (full tensors, TP=1 names) -> the twin's, decoder tied to the word embedding."""
        assert not self.differences(cfg), self.differences(cfg)
        names, qkv = self._names(cfg), self._qkv_names(cfg)
        placed = {ours for ours, _ in names} | {ours for ours, _ in qkv} | {"embedding.weight", "head.bias"}
        unplaced = set(state) - placed
        assert not unplaced, f"Parallax tensors with no {self.NAME} place: {sorted(unplaced)}"
        out = {theirs: state[ours] for ours, theirs in names}
        for ours, theirs in qkv:
            kind = ours.rsplit(".", 1)[1]
            rows = state[ours].reshape(cfg.num_heads, 3, -1, *state[ours].shape[1:])
            for j, part in enumerate(("query", "key", "value")):
                out[f"{theirs}{part}.{kind}"] = rows[:, j].reshape(-1, *state[ours].shape[1:])
        _, _, bias, decoder = self.head
        out[self.prefix + "embeddings.word_embeddings.weight"] = state["embedding.weight"][:vocab_size]
        out[bias] = out[decoder + ".bias"] = state["head.bias"][:vocab_size]
        return {name: t.contiguous() for name, t in out.items()}

    def from_hf(self, hf: dict[str, torch.Tensor], cfg: ModelConfig, padded_vocab_size: int) -> dict[str, torch.Tensor]:
        """The inverse: the vocabulary (word embedding and output bias) padded with zeros."""
        out = {ours: hf[theirs] for ours, theirs in self._names(cfg)}
        for ours, theirs in self._qkv_names(cfg):
            kind = ours.rsplit(".", 1)[1]
            parts = [hf[f"{theirs}{part}.{kind}"] for part in ("query", "key", "value")]
            heads = torch.stack([p.reshape(cfg.num_heads, -1, *p.shape[1:]) for p in parts], dim=1)
            out[ours] = heads.reshape(-1, *parts[0].shape[1:])
        out["embedding.weight"] = padded_vocabulary(hf[self.prefix + "embeddings.word_embeddings.weight"],
                                                    padded_vocab_size)
        bias = hf[self.head[2]]
        out["head.bias"] = torch.cat([bias, bias.new_zeros(padded_vocab_size - bias.shape[0])])
        return {name: t.contiguous() for name, t in out.items()}


BERT_HEAD = ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.bias",
             "cls.predictions.decoder")
BERT = EncoderTwin("BERT", "bert", "BertConfig", "bert.", BERT_HEAD, pre_norm=False, shifted_positions=False)
ROBERTA = EncoderTwin("RoBERTa", "roberta", "RobertaConfig", "roberta.",
                      ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias", "lm_head.decoder"),
                      pre_norm=False, shifted_positions=True)
MEGATRON_BERT = EncoderTwin("Megatron-BERT", "megatron-bert", "MegatronBertConfig", "bert.", BERT_HEAD,
                            pre_norm=True, shifted_positions=False)
