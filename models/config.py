"""Architecture hyper-parameters: the `model:` section of a run config."""
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator


class MoEConfig(BaseModel):
    """Mixture-of-experts feed-forward layers: GShard (top-2) or Switch (top-1) routing."""

    model_config = ConfigDict(extra="forbid")

    num_experts: PositiveInt = 4
    every: PositiveInt = Field(2, description="an MoE layer replaces the MLP of every k-th block (GShard: 2)")
    top_k: Literal[1, 2] = 2
    capacity_factor: float = Field(1.25, gt=0, description="expert capacity = factor x tokens x top_k / experts")
    eval_capacity_factor: float = Field(2.0, gt=0)
    min_capacity: NonNegativeInt = 4
    drop_tokens: bool = Field(True, description="drop tokens over capacity; false sizes capacity to the busiest expert")
    aux_loss_coef: float = Field(0.01, ge=0, description="load-balancing loss weight (GShard/Switch)")
    z_loss_coef: float = Field(1e-3, ge=0, description="router z-loss weight (ST-MoE)")
    gate_noise: Literal["none", "jitter", "rsample"] = Field(
        "none", description="jitter: multiplicative input noise (Switch); rsample: Gumbel noise on top-1 choice"
    )

    @model_validator(mode="after")
    def _top_k_within_experts(self):
        if self.top_k > self.num_experts:
            raise ValueError(f"model.moe.top_k={self.top_k} exceeds model.moe.num_experts={self.num_experts}")
        if self.gate_noise == "rsample" and self.top_k != 1:
            raise ValueError("model.moe.gate_noise=rsample applies to top-1 routing only; use jitter or set top_k=1")
        return self


class MemoryConfig(BaseModel):
    """Recurrent memory (RMT, Bulatov et al. 2022, decoder form of LM-RMT): a window of data.seq_len tokens is
    split into segments of segment_len, each run as [read memory; tokens; write memory], the memory the next
    segment reads being the last block's output at the write positions (docs/memory.md)."""

    model_config = ConfigDict(extra="forbid")

    num_mem_tokens: PositiveInt = Field(10, description="memory tokens read (and written) by each segment")
    segment_len: PositiveInt = Field(description="ordinary tokens per segment; data.seq_len is a multiple of it")
    bptt_segments: int = Field(
        -1, ge=-1, description="how many segments back the last segment's loss reaches through the memory: the "
        "memory a segment reads carries gradient only into the last bptt_segments segments; -1: all (full BPTT)",
    )


# Fields that only the T5 encoder-decoder reads; another architecture's config must leave them unset (None).
T5_ONLY = ("num_decoder_layers", "kv_channels", "relative_attention_num_buckets", "relative_attention_max_distance",
           "feed_forward")
# Fields that only the GPT family reads.
GPT_ONLY = ("mlp", "num_kv_heads", "memory")
# Fields that only the BERT encoder reads.
BERT_ONLY = ("norm_placement", "type_vocab_size", "position_offset")
# What each architecture must leave unset: every field another one reads alone, and what it has no use for.
UNSET = {
    "gpt": T5_ONLY + BERT_ONLY,
    "t5": GPT_ONLY + BERT_ONLY + ("linear_bias",),
    "bert": T5_ONLY + GPT_ONLY + ("moe",),
}


class ModelConfig(BaseModel):
    """One schema for every architecture: `arch` picks GPT (decoder-only), T5 (encoder-decoder) or BERT
    (encoder-only, masked language modelling).

    Shared fields mean the same in all (num_layers is T5's encoder depth). Fields only one
    architecture reads default to None and are read through the properties below, which give that
    architecture's defaults. A Llama-style decoder is a GPT with rotary positions, RMSNorm, SwiGLU,
    grouped-query attention, no linear biases and an untied output layer (configs/llama-*.yaml).
    RoBERTa is a BERT whose positions start at position_offset 2 and that has one token type;
    Megatron-BERT is a BERT with norm_placement pre (configs/bert-*.yaml, roberta-*.yaml).
    """

    model_config = ConfigDict(extra="forbid")

    arch: Literal["gpt", "t5", "bert"] = "gpt"
    num_layers: PositiveInt = 4
    hidden_size: PositiveInt = 256
    num_heads: PositiveInt = 4
    ffn_hidden_size: Optional[PositiveInt] = Field(None, description="default 4 x hidden_size")
    max_seq_len: PositiveInt = 256
    vocab_size: Optional[PositiveInt] = Field(None, description="default: the tokenizer's vocabulary")
    vocab_multiple: PositiveInt = Field(
        128,
        description="the embedding is padded to a multiple of this, independent of TP, "
        "so every layout builds the same model and checkpoints move between layouts",
    )
    position_embedding: Literal["learned", "rotary"] = "learned"
    rotary_base: float = Field(10000.0, gt=0, description="Hugging Face's rope_theta: 10000 (Llama 2), 500000 (Llama 3)")
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = Field(1e-5, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    init_std: float = Field(0.02, gt=0)
    moe: Optional[MoEConfig] = Field(None, description="mixture-of-experts layers; none for a dense model")
    init_from: Optional[Path] = Field(
        None, description="a Hugging Face model directory to start from (any architecture models/huggingface/ has a "
        "twin for): its config.json gives the model fields this section leaves unset (one set that disagrees is "
        "refused), its weights the starting model at any layout, its tokenizer.json data.tokenizer unless that is "
        "set. A run that resumes a checkpoint starts from the checkpoint instead, as Megatron's --load wins over "
        "--pretrained-checkpoint",
    )
    tie_embeddings: Optional[bool] = Field(
        None, description="output layer tied to the embedding (GPT-2; T5, which feeds it d_model**-0.5 x the decoder "
        "output) or a matrix of its own (Llama; T5.1.1, unscaled); default true",
    )
    # GPT only (arch: gpt); see GPT_ONLY.
    mlp: Optional[Literal["gelu", "swiglu"]] = Field(
        None, description="gpt: fc_out(gelu(fc_in x)) (GPT) or fc_out(silu(fc_gate x) * fc_in x) (SwiGLU, Llama); "
        "default gelu",
    )
    num_kv_heads: Optional[PositiveInt] = Field(
        None, description="gpt: key/value heads, each shared by num_heads / num_kv_heads query heads (grouped-query "
        "attention, Ainslie et al. 2023); default num_heads",
    )
    linear_bias: Optional[bool] = Field(None, description="gpt, bert: linear layers with biases (GPT, BERT) or "
                                        "without (Llama); default true")
    memory: Optional[MemoryConfig] = Field(
        None, description="gpt: recurrent memory tokens carried from segment to segment (docs/memory.md); none: a "
        "plain decoder",
    )
    # BERT only (arch: bert); see BERT_ONLY.
    norm_placement: Optional[Literal["post", "pre"]] = Field(
        None, description="bert: LayerNorm after each residual sum (post: BERT, RoBERTa, with one on the embeddings) "
        "or before each sub-layer and at the end (pre: Megatron-BERT, which keeps improving with scale); default post",
    )
    type_vocab_size: Optional[NonNegativeInt] = Field(
        None, description="bert: token types (segment A/B) with a learned embedding each; 0: none; default 2 (BERT; "
        "RoBERTa has 1)",
    )
    position_offset: Optional[NonNegativeInt] = Field(
        None, description="bert: the first token's position row; RoBERTa's positions start after its padding id, at "
        "2, so its table has max_seq_len + 2 rows (514); default 0",
    )
    # T5 only (arch: t5); see T5_ONLY.
    num_decoder_layers: Optional[PositiveInt] = Field(None, description="t5: decoder depth; default num_layers")
    kv_channels: Optional[PositiveInt] = Field(
        None, description="t5: width of each attention head (T5's d_kv); default hidden_size / num_heads"
    )
    relative_attention_num_buckets: Optional[PositiveInt] = Field(None, description="t5: default 32")
    relative_attention_max_distance: Optional[PositiveInt] = Field(None, description="t5: default 128")
    feed_forward: Optional[Literal["relu", "gated-gelu"]] = Field(
        None, description="t5: relu (T5) or gated-gelu (T5.1.1); default relu"
    )

    @model_validator(mode="after")
    def _fields_fit_the_architecture(self):
        for name in UNSET[self.arch]:
            if getattr(self, name) is not None:
                readers = [arch for arch, unset in UNSET.items() if name not in unset]
                raise ValueError(f"model.{name} applies to model.arch={' or '.join(readers)} only; remove it")
        if self.arch == "bert":
            self._check_bert()
        if self.arch == "t5" and self.position_embedding != "learned":
            raise ValueError("model.position_embedding applies to model.arch=gpt only: T5 uses its relative "
                             "position bias; remove it")
        if self.arch == "t5" and self.norm != "rmsnorm":
            raise ValueError("model.norm=layernorm: T5 normalises with RMSNorm (no mean, no bias); set model.norm=rmsnorm")
        if self.num_buckets < 4:
            raise ValueError(f"model.relative_attention_num_buckets={self.num_buckets} is below 4 "
                             "(half per direction, half of those exact offsets); use 32 as T5 does")
        if self.max_distance <= self.num_buckets // 2:
            raise ValueError(f"model.relative_attention_max_distance={self.max_distance} must exceed the exact "
                             f"offsets, half of model.relative_attention_num_buckets={self.num_buckets}; raise it")
        return self

    def _check_bert(self):
        wanted = [
            (self.position_embedding == "learned", "model.position_embedding: BERT has learned positions; remove it"),
            (self.norm == "layernorm", "model.norm=rmsnorm: BERT normalises with LayerNorm; set model.norm=layernorm"),
            (self.tied, "model.tie_embeddings=false: BERT's output layer is its word embedding; remove it"),
        ]
        for holds, problem in wanted:
            if not holds:
                raise ValueError(problem)

    @model_validator(mode="after")
    def _heads_divide_hidden(self):
        if self.hidden_size % self.num_heads and not (self.arch == "t5" and self.kv_channels):
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}; "
                "pick a head count that divides the hidden size"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(f"model.num_kv_heads={self.kv_heads} does not divide model.num_heads={self.num_heads}: "
                             "each key/value head serves a whole group of query heads")
        return self

    @model_validator(mode="after")
    def _memory_segment_fits(self):
        mem = self.memory
        if mem is not None and mem.segment_len + 2 * mem.num_mem_tokens > self.max_seq_len:
            raise ValueError(
                f"model.memory: a segment is model.memory.segment_len={mem.segment_len} tokens between "
                f"2 x model.memory.num_mem_tokens={mem.num_mem_tokens} memory tokens, more than "
                f"model.max_seq_len={self.max_seq_len} positions; raise max_seq_len or shorten the segment"
            )
        return self

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and (layer + 1) % self.moe.every == 0

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def swiglu(self) -> bool:
        return self.mlp == "swiglu"

    @property
    def biased(self) -> bool:
        """Linear layers with biases: a GPT's or BERT's unless linear_bias is false; T5's never."""
        return self.arch != "t5" and self.linear_bias is not False

    @property
    def pre_norm(self) -> bool:
        """Each sub-layer reads a normalised input (GPT, T5, Megatron-BERT), rather than each residual sum being
        normalised (BERT, RoBERTa)."""
        return self.arch != "bert" or self.norm_placement == "pre"

    @property
    def token_types(self) -> int:
        return 2 if self.type_vocab_size is None else self.type_vocab_size

    @property
    def first_position(self) -> int:
        return self.position_offset or 0

    @property
    def num_buckets(self) -> int:
        return self.relative_attention_num_buckets or 32

    @property
    def max_distance(self) -> int:
        return self.relative_attention_max_distance or 128

    @property
    def gated(self) -> bool:
        return self.feed_forward == "gated-gelu"

    @property
    def tied(self) -> bool:
        return self.tie_embeddings is not False

    def padded_vocab_size(self, vocab_size: int) -> int:
        return -(-vocab_size // self.vocab_multiple) * self.vocab_multiple
