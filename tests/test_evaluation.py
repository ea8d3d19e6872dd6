"""Issue 15: validation loss during training and `parallax eval`.

The eval loss of the same weights at each layout equals one process's (the scenarios in
tests/distributed/scenarios_eval.py); evaluating leaves training bitwise alone; a stopped and
resumed run evaluates to the same numbers at the same steps; bad validation input stops a run in
one line before its first step.
"""
import subprocess
import sys

import pytest

EVAL_TOL = 1e-5
PARALLAX = [sys.executable, "-c", "from launcher.cli import main; main()"]


@pytest.mark.parametrize("layout,reference", [
    ("eval_gpt_tp2", "eval_gpt_reference"),
    ("eval_gpt_tp2_sequence_parallel", "eval_gpt_reference"),
    ("eval_gpt_dp2_zero3", "eval_gpt_reference"),
    ("eval_gpt_tp2_dp2", "eval_gpt_reference"),
    ("eval_gpt_moe_ep2", "eval_gpt_moe_reference"),
    ("eval_t5_tp2", "eval_t5_reference"),
    ("eval_t5_dp2_zero3", "eval_t5_reference"),
    ("eval_t5_tp2_dp2", "eval_t5_reference"),
    ("eval_switch_t5_ep2", "eval_switch_t5_reference"),
])
def test_eval_loss_of_the_same_weights_matches_one_process(scenario_results, layout, reference):
    expected, got = scenario_results(reference), scenario_results(layout)
    assert got["eval_tokens"] == expected["eval_tokens"] > 0
    assert abs(got["eval_loss"] - expected["eval_loss"]) <= EVAL_TOL, (got, expected)
    assert got["eval_ppl"] == pytest.approx(expected["eval_ppl"], rel=EVAL_TOL)


def training(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def evaluations(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]


def test_evaluating_leaves_training_bitwise_alone(scenario_results):
    runs = scenario_results("evaluation_in_training")
    assert training(runs["with"]) == training(runs["without"])  # bitwise: the same floats
    assert [step for step, _ in evaluations(runs["with"])] == [0, 2, 4, 6]  # before the first step, every 2, the last
    assert evaluations(runs["without"]) == []


def test_a_resumed_run_evaluates_to_the_same_numbers_at_the_same_steps(scenario_results):
    runs = scenario_results("evaluation_in_training")
    assert [r["step"] for r in runs["stopped"] if "loss" in r] == [1, 2, 3]
    assert evaluations(runs["stopped"]) + evaluations(runs["resumed"]) == evaluations(runs["with"])


def test_bad_validation_data_stops_the_run_in_one_line_before_its_first_step(tmp_path):
    proc = subprocess.run([*PARALLAX, "train", "configs/gpt-tiny.yaml", "model.num_layers=1", "train.steps=2",
                           f"data.validation=[{{path: {tmp_path / 'nope'}}}]", f"logging.run_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("parallax: error")]
    assert len(errors) == 1 and f"{tmp_path / 'nope'}: data source path does not exist; fix data.validation[].path" \
        in errors[0], proc.stderr[-2000:]
    assert "step 1/" not in proc.stdout and not (tmp_path / "run" / "metrics.jsonl").exists()
