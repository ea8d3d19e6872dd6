"""Architecture hyper-parameters: the `model:` section of a run config."""
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator


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

    @model_validator(mode="after")
    def _heads_divide_hidden(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}; "
                "pick a head count that divides the hidden size"
            )
        return self

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    def padded_vocab_size(self, vocab_size: int) -> int:
        return -(-vocab_size // self.vocab_multiple) * self.vocab_multiple
