"""Issue 27, point 3: BERT at TP=2 with sequence parallelism, DP=2 at ZeRO-3 and TP=2 x DP=2 equals one process
(logits and gradients within 1e-5, the 3-step loss curve within 1e-4), and its checkpoints resume exactly and
reshard onto one process. The scenarios are in tests/distributed/scenarios_bert.py."""

import pytest

from tests.distributed.scenarios_bert import SAVED_AT, STEPS
from tests.test_checkpoint import assert_reload_is_the_checkpoint
from tests.test_parity import assert_model_matches, assert_training_matches

HEAD = ("head.dense.weight", "head.dense.bias", "head.norm.weight", "head.norm.bias", "head.bias")


@pytest.mark.parametrize("layout,reference", [
    ("bert_tp2_model", "bert_reference_model"),
    ("bert_tp2_sp_model", "bert_reference_model"),
    ("bert_pre_ln_tp2_sp_model", "bert_pre_ln_reference_model"),
])
def test_tensor_parallel_logits_loss_and_gradients_match_one_process(scenario_results, layout, reference):
    """Every parameter's gradient, the replicated ones applied to a slice of the sequence under SP (position and
    token-type tables, norms, the head's transform) and the vocabulary-parallel output bias included."""
    reference = scenario_results(reference)
    assert {*HEAD, "token_type_embedding.weight", "position_embedding.weight"} <= reference["grads"].keys()
    assert all(reference["grads"][name].abs().sum() > 0 for name in HEAD), "the head's gradients must be real"
    assert reference["logits"].shape == (32, 4, 512)
    assert_model_matches(reference, scenario_results(layout))


@pytest.mark.parametrize("layout,reference", [
    ("bert_tp2_sp_training", "bert_reference_training"),
    ("bert_pre_ln_tp2_sp_training", "bert_pre_ln_reference_training"),
    ("bert_dp2_zero3_training", "bert_reference_training"),
    ("bert_grad_accum_training", "bert_reference_training"),
    ("bert_tp2_sp_dp2_zero3_training", "bert_reference_training"),
])
def test_three_steps_match_one_process(scenario_results, layout, reference):
    reference = scenario_results(reference)
    assert len(reference) == 3 and reference[-1]["loss"] < reference[0]["loss"], "the reference itself must learn"
    assert_training_matches(reference, scenario_results(layout))


@pytest.mark.parametrize("name", ["bert_exact_resume_tp2_sp", "bert_exact_resume_dp2_zero3"])
def test_resumed_losses_are_bitwise_equal(scenario_results, name):
    runs = scenario_results(name)
    straight, resumed = runs["straight"], runs["resumed"]
    assert [r["step"] for r in straight] == list(range(1, STEPS + 1))
    assert [r["step"] for r in resumed] == list(range(SAVED_AT + 1, STEPS + 1)), "resume must continue after the save"
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in straight[SAVED_AT:]], key


@pytest.mark.parametrize("name,uninterrupted", [
    ("bert_reshard_tp2_sp_to_tp1", "bert_exact_resume_tp2_sp"),
    ("bert_reshard_dp2_zero3_to_tp1", "bert_exact_resume_dp2_zero3"),
])
def test_reshard_onto_one_process_keeps_weights_and_moments_and_continues_the_curve(scenario_results, name,
                                                                                     uninterrupted):
    """One process reloads exactly the tensors the files hold (the head's vocabulary-parallel bias joined from
    its TP slices), and the rest of the run from there follows the uninterrupted run of the saving layout."""
    saved = assert_reload_is_the_checkpoint(scenario_results(name),
                                            scenario_results(uninterrupted)["straight"][SAVED_AT:])
    assert set(HEAD) <= saved.keys() and saved["head.bias"]["param"].shape == (512,)
