"""Issue 5: mixture-of-experts layers, expert parallelism and their accounting."""
import math

import pytest
import torch

from tests.test_parity import assert_training_matches

MOE_TOL = 1e-5


def assert_moe_gradients_match(reference: dict, layout: dict):
    assert abs(layout["loss"] - reference["loss"]) <= MOE_TOL
    for kind in ("experts", "dense"):
        assert layout[kind].keys() == reference[kind].keys(), kind
        for name, grad in reference[kind].items():
            torch.testing.assert_close(layout[kind][name], grad, atol=MOE_TOL, rtol=0, msg=lambda m: f"{name}: {m}")


def test_ep2_matches_ep1_gradients(scenario_results):
    reference, ep2 = scenario_results("moe_ep1_gradients"), scenario_results("moe_ep2_gradients")
    assert len(reference["experts"]) == 2 * 4 * 4  # 2 MoE layers x 4 experts x (2 weights + 2 biases)
    assert_moe_gradients_match(reference, ep2)


@pytest.mark.parametrize("layout", ["moe_ep2_training", "moe_ep2_zero2_training"])
def test_ep2_matches_ep1_over_three_steps(scenario_results, layout):
    assert_training_matches(scenario_results("moe_ep1_training"), scenario_results(layout), tol=MOE_TOL)


def test_tp2_ep2_matches_one_process_gradients(scenario_results):
    assert_moe_gradients_match(scenario_results("moe_reference_gradients"), scenario_results("moe_tp2_ep2_gradients"))


def test_tp2_ep2_zero1_matches_one_process_over_three_steps(scenario_results):
    reference = scenario_results("moe_reference_training")
    assert reference[-1]["loss"] < reference[0]["loss"]
    assert_training_matches(reference, scenario_results("moe_tp2_ep2_zero1_training"), tol=MOE_TOL)


def test_moe_metrics_are_logged_per_layer(scenario_results):
    record = scenario_results("moe_ep2_training")[0]
    assert [m["layer"] for m in record["moe"]] == [0, 1]
    for layer in record["moe"]:
        assert len(layer["tokens_per_expert"]) == 4 and layer["dropped_fraction"] == 0.0
        assert layer["aux_loss"] > 0 and layer["z_loss"] > 0


def _hand_routing(x, gate, top_k, capacity_factor, num_experts=4, min_capacity=1):
    """GShard routing recomputed from the gate logits: choices, losses and what overflows capacity."""
    tokens = x.reshape(-1, x.shape[-1])
    logits = tokens @ gate.T
    probs = logits.softmax(-1)
    choices = logits.topk(top_k, dim=-1).indices  # [T, k], first choice first
    t = tokens.shape[0]
    first = torch.bincount(choices[:, 0], minlength=num_experts)
    demand = torch.bincount(choices.flatten(), minlength=num_experts)
    capacity = max(math.ceil(t / num_experts * capacity_factor * top_k), min_capacity)
    # First choices take the slots first, in token order; second choices queue behind all of them.
    dropped = sum(max(0, int(first[e]) - capacity) for e in range(num_experts))
    if top_k == 2:
        second = demand - first
        dropped += sum(max(0, int(second[e]) - max(0, capacity - int(first[e]))) for e in range(num_experts))
    return {
        "tokens_per_expert": demand,
        "aux_loss": num_experts * (probs.mean(0) * (first.float() / t)).sum(),
        "z_loss": torch.logsumexp(logits, -1).square().mean(),
        "dropped": dropped,
        "pairs": t * top_k,
    }


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_choices_and_losses_match_a_hand_computation(scenario_results, top_k):
    run = scenario_results("moe_router")
    got = run["by_top_k"][top_k]
    hand = _hand_routing(run["x"], run["gate"], top_k, run["capacity_factor"])
    assert got["tokens_per_expert"].tolist() == hand["tokens_per_expert"].tolist()
    torch.testing.assert_close(got["aux_loss"], hand["aux_loss"], atol=1e-6, rtol=0)
    torch.testing.assert_close(got["z_loss"], hand["z_loss"], atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropped_fraction_is_the_count_over_capacity(scenario_results, top_k):
    run = scenario_results("moe_router")
    got = run["by_top_k"][top_k]
    hand = _hand_routing(run["x"], run["gate"], top_k, run["capacity_factor"])
    assert hand["dropped"] > 0, "the capacity factor must be small enough to drop"
    assert got["dropped_fraction"].item() == pytest.approx(hand["dropped"] / hand["pairs"])
    if top_k == 1:  # a dropped token skips the layer: its MoE output is exactly zero
        zero_rows = (got["output"].reshape(-1, got["output"].shape[-1]) == 0).all(-1).sum().item()
        assert zero_rows == hand["dropped"]
