"""Issue 25 point 5, and the data pipeline and stop votes of point 6: checkpoints stay layout-free under
pipeline parallelism, and a pipelined run resumes exactly.

The runs are real ranks on gloo under the real DeepSpeed engine (tests/distributed/scenarios_pipeline_
checkpoint.py); the checkpoints are real files, read back here without any of the code that wrote them.
The crash, preemption and `parallax eval`/`export`/`generate`/`consolidate` tests of a PP=2 run, through
the `parallax` command, are in tests/test_checkpoint_recovery.py.
"""
from pathlib import Path

import pytest
import torch

from tests.distributed.scenarios_checkpoint import SAVED_AT, STEPS, read_full_tensors

LOSS_CURVE_TOL = 1e-4
FIGURES = ("step", "loss", "grad_norm", "lr", "eval_loss", "eval_tokens")  # what a resume must reproduce bitwise


def assert_bitwise_resume(straight: list[dict], resumed: list[dict]) -> None:
    assert [r["step"] for r in straight] == list(range(1, STEPS + 1))
    assert [r["step"] for r in resumed] == list(range(SAVED_AT + 1, STEPS + 1)), "resume must continue after step 10"
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in straight[SAVED_AT:]], key


@pytest.mark.parametrize("name", ["exact_resume_pp2", "exact_resume_pp4"])
def test_a_pipelined_run_resumes_bitwise(scenario_results, name):
    """The last stage resumes its copy of the tied embedding (and its Adam moments) from the first stage's
    shard: at the saved layout it read only its own, found no embedding.weight and refused the checkpoint."""
    runs = scenario_results(name)
    assert_bitwise_resume(runs["straight"], runs["resumed"])


def test_only_the_ends_of_a_pipeline_read_batches_and_the_first_stage_saves_where_they_are(scenario_results):
    """At PP=4 the stages between the ends never iterate their batch source; the checkpoint holds one loader
    state (one DP rank's, written by the first stage) and one shard per rank."""
    runs = scenario_results("exact_resume_pp4")
    assert sorted(runs["iterated"]) == [(0, True), (1, False), (2, False), (3, True)]
    assert runs["files"] == ["client.pt", "config.yaml", "data-00000.pt",
                             *(f"shard-{rank:05d}.pt" for rank in range(4))]


@pytest.mark.parametrize("name,uninterrupted", [
    ("reshard_pp2_to_pp1", "exact_resume_pp2"),
    ("reshard_pp1_to_pp2", "four_layers_at_pp1"),
    ("reshard_pp2_to_pp4", "exact_resume_pp2"),
    ("reshard_pp4_to_pp2_dp2", "exact_resume_pp4"),
])
def test_a_pipeline_reshard_keeps_weights_and_moments_and_continues_the_curve(scenario_results, name, uninterrupted):
    """Reloaded at another pipeline size, the stages together hold exactly the saved fp32 masters and Adam
    moments, each parameter once; the last stage's copy of the tied embedding (when PP > 1) is the saved
    embedding, moments included; and steps 11-20 follow the saving layout's uninterrupted run."""
    result = scenario_results(name)
    saved = read_full_tensors(Path(result["checkpoint"]))
    reloaded = result["tensors"]
    assert "embedding.weight" in saved and "blocks.3.mlp.fc_out.weight" in saved
    assert reloaded.keys() == saved.keys() and result["held_twice"] == []
    for param, tensors in saved.items():
        assert tensors["exp_avg_sq"].abs().sum() > 0, f"{param}: the saved moments must be real"
        for key, value in tensors.items():
            assert torch.equal(reloaded[param][key], value), f"{param} {key} changed in the reload"
    if name.endswith("pp1"):
        assert result["tied_copy"] is None
    else:
        for key, value in saved["embedding.weight"].items():
            assert torch.equal(result["tied_copy"][key], value), f"the last stage's tied copy ({key}) differs"
    reference = scenario_results(uninterrupted)["straight"][SAVED_AT:]
    curve = result["curve"]
    assert [r["step"] for r in curve] == [r["step"] for r in reference]
    for ref, got in zip(reference, curve):
        assert abs(got["loss"] - ref["loss"]) <= LOSS_CURVE_TOL, f"step {ref['step']}: {got['loss']} vs {ref['loss']}"


def test_checkpoints_at_every_pipeline_size_hold_the_same_tensors(scenario_results):
    """The format does not record the split: PP=1, 2 and 4 write the same names and shapes, each once."""
    shapes = []
    for reshard, saved_at in (("reshard_pp1_to_pp2", "pp1"), ("reshard_pp2_to_pp1", "pp2"),
                              ("reshard_pp4_to_pp2_dp2", "pp4")):
        path = Path(scenario_results(reshard)["checkpoint"])
        assert path.parent.parent.name == saved_at
        shapes.append({name: tensors["param"].shape for name, tensors in read_full_tensors(path).items()})
    assert shapes[0] == shapes[1] == shapes[2]


def test_the_real_data_pipeline_at_pp2_stops_at_a_step_and_resumes_exactly(scenario_results):
    """PP=2 x DP=2 on the real loader (id corpus), evaluating every 2 steps: train.stop_at_step=3 saves and
    stops after step 3 (every rank votes), with one loader state per DP rank, written by the first stage;
    the relaunch resumes at step 4, and steps 4-6, their evaluations and the very batches each rank's loader
    hands out are those of the uninterrupted run. Both ends of each DP rank's pipeline read the same batches."""
    result = scenario_results("real_data_stopped_and_resumed_at_pp2_dp2")
    straight, stopped, resumed = result["straight"], result["stopped"], result["resumed"]
    assert [r["step"] for r in stopped["records"] if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in resumed["records"] if "loss" in r] == [4, 5, 6]
    figures = lambda records: [{k: r.get(k) for k in FIGURES} for r in records]  # noqa: E731
    assert figures(stopped["records"] + resumed["records"]) == figures(straight["records"])
    assert [r["step"] for r in resumed["records"] if "eval_loss" in r] == [4, 6]
    assert result["files"] == ["client.pt", "config.yaml", "data-00000.pt", "data-00001.pt",
                               *(f"shard-{rank:05d}.pt" for rank in range(4))]
    by_rank = lambda run: {(pp, dp): batches for pp, dp, batches in run["batches"]}  # noqa: E731
    whole, first, second = by_rank(straight), by_rank(stopped), by_rank(resumed)
    assert sorted(whole) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for rank, batches in whole.items():
        assert len(batches) == 6 * 2  # steps x micro-batches
        assert all(torch.equal(a, b) for a, b in zip(batches, first[rank] + second[rank]))
        assert len(first[rank]) == len(second[rank]) == 6
        assert all(torch.equal(a, b) for a, b in zip(batches, whole[(0, rank[1])])), "the ends read alike"
    assert not all(torch.equal(a, b) for a, b in zip(whole[(0, 0)], whole[(0, 1)])), "DP ranks read apart"
