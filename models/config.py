"""Architecture hyper-parameters: the `model:` section of a run config."""
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


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: Literal["gpt"] = "gpt"
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
    rotary_base: float = Field(10000.0, gt=0)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = Field(1e-5, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    init_std: float = Field(0.02, gt=0)
    moe: Optional[MoEConfig] = Field(None, description="mixture-of-experts layers; none for a dense model")

    @model_validator(mode="after")
    def _heads_divide_hidden(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}; "
                "pick a head count that divides the hidden size"
            )
        return self

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and (layer + 1) % self.moe.every == 0

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    def padded_vocab_size(self, vocab_size: int) -> int:
        return -(-vocab_size // self.vocab_multiple) * self.vocab_multiple
