"""Issue 17: each rank draws only the weights it keeps, and one seed is still one model at every TP size."""
import math

import pytest
import torch


@pytest.mark.parametrize("style", ["gpt2", "llama_style"])
@pytest.mark.parametrize("layout", ["tp2_initial_weights", "dp2_zero3_initial_weights"])
def test_one_seed_is_the_same_bits_at_every_layout(scenario_results, style, layout):
    reference, other = scenario_results("reference_initial_weights")[style], scenario_results(layout)[style]
    assert other["weights"].keys() == reference["weights"].keys()
    for name, weight in reference["weights"].items():
        assert torch.equal(other["weights"][name], weight), name


@pytest.mark.parametrize("style", ["gpt2", "llama_style"])
def test_zero3_builds_the_model_partitioned(scenario_results, style):
    """Issue 17: at ZeRO-3 each DP rank holds only its partition of every parameter once it is built
    (deepspeed.zero.Init), not the TP shard that deepspeed.initialize used to partition; at DP=2, half
    (the tiny model's partitions are even), where it used to hold all of it."""
    assert scenario_results("reference_initial_weights")[style]["most_held"] == 1.0
    assert scenario_results("dp2_zero3_initial_weights")[style]["most_held"] == 0.5


@pytest.mark.parametrize("style", ["gpt2", "llama_style"])
def test_a_tp2_rank_draws_only_its_half_of_each_split_weight(scenario_results, style):
    reference, tp2 = scenario_results("reference_initial_weights")[style], scenario_results("tp2_initial_weights")[style]
    # At TP=1 every element is drawn once; at TP=2 rank 0 skips the other rank's half of each split weight.
    assert reference["drawn"] == sum(w.numel() for name, w in reference["weights"].items()
                                     if name.endswith("weight") and "norm" not in name)
    assert tp2["drawn"] == reference["drawn"] - tp2["split_weights"]


def test_gpt2_scaled_init_keeps_its_standard_deviations(scenario_results):
    """0.02 everywhere, 0.02 / sqrt(2 x layers) for the projections into the residual stream."""
    for name, weight in scenario_results("reference_initial_weights")["gpt2"]["weights"].items():
        if "norm" in name or not name.endswith("weight"):
            continue
        std = 0.02 / math.sqrt(2 * 2) if name.endswith(("attn.proj.weight", "mlp.fc_out.weight")) else 0.02
        assert weight.std().item() == pytest.approx(std, rel=0.05), name
        assert weight.mean().abs().item() < 3 * std / math.sqrt(weight.numel()), name
