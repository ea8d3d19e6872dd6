"""Mixture-of-experts feed-forward layer: GShard (Lepikhin et al. 2020) top-2 and Switch (Fedus et
al. 2021) top-1 routing, with experts sharded over the expert-parallel (EP) group.

Built on `deepspeed.moe`: its all-to-all dispatch runs on gloo and NCCL alike, and DeepSpeed's
engine and ZeRO 1/2 reduce expert gradients over the expert-data-parallel group (the ranks holding
the same experts) only when the experts live in a `deepspeed.moe.layer.MoE`. DeepSpeed supplies
the gate (top-k, capacity, token dropping, gate noise) and the load-balancing loss; this module adds
the router z-loss (Zoph et al. 2022), layout-independent expert initialisation and the per-layer
metrics a user watches: tokens per expert and the fraction dropped.

Experts are replicated over the tensor-parallel ranks (the dense layers are TP-split): each TP
peer sends only its share of the duplicate tokens through the all-to-all, and DeepSpeed gathers the
shares back before and after the experts, so every TP peer computes the same expert gradients
(see parallel/topology.py for the groups).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe import mappings as deepspeed_mappings
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import _capacity
from deepspeed.moe.utils import is_moe_param
from deepspeed.utils import groups as deepspeed_groups
from megatron.core import parallel_state
from torch import nn

from models.config import ModelConfig
from models.init import draw_normal

_GATE_NOISE = {"none": None, "jitter": "Jitter", "rsample": "RSample"}


def _gather_tokens_for_gloo(tokens: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """All-gather over the TP group along `dim`, as deepspeed.moe.mappings._gather_tokens does, but
    into per-rank tensors of the input's shape: DeepSpeed gathers into a flat buffer, which NCCL
    accepts and gloo refuses ("invalid tensor size"), so TP x EP could not run on CPU."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(tp_group) == 1:
        return tokens
    parts = [torch.empty_like(tokens) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, tokens.contiguous(), group=tp_group)
    return torch.cat(parts, dim=dim)


_DEEPSPEED_GATHER_TOKENS = deepspeed_mappings._gather_tokens


def use_token_gather_for(tp_backend: str) -> None:
    """The token gather DeepSpeed's MoE layer calls (the forward of its gather and the backward of its
    drop): ours on gloo; on NCCL DeepSpeed's own, one all-gather into a flat buffer."""
    deepspeed_mappings._gather_tokens = _gather_tokens_for_gloo if tp_backend == "gloo" else _DEEPSPEED_GATHER_TOKENS


def is_expert_parameter(p: torch.nn.Parameter) -> bool:
    """Expert weights are the ones DeepSpeed reduces over the expert-data-parallel group."""
    return is_moe_param(p)


class Expert(nn.Module):
    """One expert: the dense block's MLP, unsplit."""

    def __init__(self, hidden_size: int, ffn_size: int):
        super().__init__()
        self.fc_in = nn.Linear(hidden_size, ffn_size)
        self.fc_out = nn.Linear(ffn_size, hidden_size)

    def forward(self, x):
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class MoEFeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, expert_parallel_size: int, output_std: float):
        super().__init__()
        self.moe_cfg = m = cfg.moe
        use_token_gather_for(dist.get_backend(parallel_state.get_tensor_model_parallel_group()))
        self.layer = MoE(
            hidden_size=cfg.hidden_size,
            expert=Expert(cfg.hidden_size, cfg.ffn_size),
            num_experts=m.num_experts,
            ep_size=expert_parallel_size,
            k=m.top_k,
            capacity_factor=m.capacity_factor,
            eval_capacity_factor=m.eval_capacity_factor,
            min_capacity=m.min_capacity,
            noisy_gate_policy=_GATE_NOISE[m.gate_noise],
            drop_tokens=m.drop_tokens,
            use_rts=False,  # random token selection would make the dropped set depend on the RNG
            top2_2nd_expert_sampling=False,  # the second expert is the gate's second choice
        )
        self.gate_weight = self.layer.deepspeed_moe.gate.wg.weight
        self._init_weights(cfg.init_std, output_std)
        self.router_loss = None
        self.metrics = {}

    @torch.no_grad()
    def _init_weights(self, std: float, output_std: float) -> None:
        """Mark the router and this rank's experts for models.init.initialise, each expert with its
        global index: it draws an expert by the name it has at EP=1, so a rank draws only its own
        experts and one seed gives one model at any EP."""
        draw_normal(self.gate_weight, std)
        local = self.layer.deepspeed_moe.experts.deepspeed_experts
        first_local = deepspeed_groups._get_expert_parallel_rank(self.layer.expert_group_name) * len(local)
        for i, expert in enumerate(local):
            for weight, weight_std in ((expert.fc_in.weight, std), (expert.fc_out.weight, output_std)):
                draw_normal(weight, weight_std).expert_index = (i, first_local + i)
            expert.fc_in.bias.zero_()
            expert.fc_out.bias.zero_()

    def forward(self, x):
        out, load_balancing_loss, tokens_per_expert = self.layer(x)
        logits = F.linear(x.reshape(-1, x.shape[-1]).float(), self.gate_weight.float())
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        self.router_loss = self.moe_cfg.aux_loss_coef * load_balancing_loss + self.moe_cfg.z_loss_coef * z_loss
        self.metrics = {
            "tokens_per_expert": tokens_per_expert.detach(),
            "dropped_fraction": self._dropped_fraction(logits, tokens_per_expert),
            "aux_loss": load_balancing_loss.detach(),
            "z_loss": z_loss.detach(),
        }
        return out

    def _dropped_fraction(self, logits, tokens_per_expert):
        """Routed (token, expert) pairs beyond an expert's capacity, over all routed pairs.

        Per expert, first choices fill the capacity before second choices, so the pairs that do not
        fit are the expert's demand minus its capacity, whatever the mix of first and second choices.
        """
        m = self.moe_cfg
        if not m.drop_tokens:
            return torch.zeros(())
        factor = m.capacity_factor if self.training else m.eval_capacity_factor
        capacity = _capacity(logits, torch.tensor(factor * m.top_k), torch.tensor(m.min_capacity))
        over = (tokens_per_expert - capacity).clamp(min=0).sum()
        return over.float() / (logits.shape[0] * m.top_k)
