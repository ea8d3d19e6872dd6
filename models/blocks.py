"""What GPT (and its Llama-style variant) and T5 are both built from: the pre-norm, the
vocabulary-parallel output layer and loss, and the per-layer MoE figures and parameter counts.

The output layer and the loss are Megatron's: each tensor-parallel (TP) rank scores its slice of
the (padded) vocabulary, and `vocab_parallel_cross_entropy` finds the softmax over the whole of it
with two all-reduces of [s, b] figures instead of gathering [s, b, vocab] logits.
"""
import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from torch import nn

from models.config import ModelConfig
from models.moe import MoEFeedForward, is_expert_parameter
from parallel.sequence_parallel import gather_sequence, replicated_parameter
from parallel.zero3 import full_shape

IGNORE_INDEX = -100  # label of a position that is not scored (Hugging Face's convention)


class Norm(nn.Module):
    """Pre-norm LayerNorm or RMSNorm (Zhang & Sennrich 2019), replicated on every TP rank."""

    def __init__(self, cfg: ModelConfig, sequence_parallel: bool):
        super().__init__()
        self.kind, self.eps, self.sequence_parallel = cfg.norm, cfg.norm_eps, sequence_parallel
        self.weight = nn.Parameter(torch.ones(cfg.hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.hidden_size)) if cfg.norm == "layernorm" else None

    def _replicated(self, p):
        # Under sequence parallelism each TP rank normalises different tokens: sum the gradient.
        return replicated_parameter(p) if self.sequence_parallel else p

    def forward(self, x):
        shape = (x.shape[-1],)
        if self.kind == "rmsnorm":
            return F.rms_norm(x, shape, self._replicated(self.weight), self.eps)
        return F.layer_norm(x, shape, self._replicated(self.weight), self._replicated(self.bias), self.eps)


def vocab_parallel_logits(x: torch.Tensor, weight: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """This rank's vocabulary slice of the logits of x [s, b, h] (this rank's [s/tp, b, h] under
    sequence parallelism): the whole sequence, [s, b, vocab / tp]. `weight` is the rank's rows of the
    output layer (the embedding, when tied). Every rank's gradient reaching x is partial, so it is
    summed over the TP group on the way back (reduce-scattered, under sequence parallelism)."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    if sequence_parallel:
        x = gather_sequence(x, tp_group)
    else:
        x = tensor_parallel.copy_to_tensor_model_parallel_region(x)
    return F.linear(x, weight)


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
    """Cross-entropy of vocabulary-parallel logits [s, b, vocab / tp] against labels [b, s], over the
    labels that are not IGNORE_INDEX: their mean (training), or with reduction="sum" (evaluation)
    their sum and how many they are, so that a mean over any split of the data is exact."""
    labels = labels.transpose(0, 1)
    scored = labels != IGNORE_INDEX
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.clamp(min=0).contiguous())
    total = (losses * scored).sum()
    if reduction == "sum":
        return total, scored.sum()
    return total / scored.sum().clamp(min=1)


def moe_metrics(feed_forwards: dict[int, nn.Module]) -> list[dict]:
    """Per MoE layer, numbered by its block's index in the model (`feed_forwards` maps it to the block's
    feed-forward), from the last forward: tokens routed to each expert, the dropped fraction and the
    router losses."""
    return [
        {"layer": layer, **{name: value.tolist() for name, value in ff.metrics.items()}}
        for layer, ff in feed_forwards.items() if isinstance(ff, MoEFeedForward)
    ]


def parameter_counts(model: nn.Module, cfg: ModelConfig, expert_parallel_size: int) -> tuple[int, int]:
    """(total, active per token) over the whole model, not just this rank's shard: a token meets
    every dense parameter but only top_k of each MoE layer's experts."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    total = active = 0
    for p in model.parameters():
        n = full_shape(p).numel()  # ZeRO-3 leaves an empty tensor in p
        if getattr(p, "tensor_model_parallel", False):
            n *= tp
        if is_expert_parameter(p):  # each rank holds num_experts / ep of them, replicated over TP
            n *= expert_parallel_size
            total, active = total + n, active + n * cfg.moe.top_k / cfg.moe.num_experts
        else:
            total, active = total + n, active + n
    return total, int(active)
