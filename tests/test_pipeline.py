"""Issue 25: pipeline parallelism computes what one process computes, at every layout it composes with.

The layouts run on real ranks (gloo, the real DeepSpeed engine) in the suite's scenario launches; see
tests/distributed/scenarios_pipeline.py. Tolerances are the other parity tests' (fp32 on CPU).
"""
import pytest

from tests.test_parity import LOSS_CURVE_TOL, assert_training_matches


@pytest.mark.parametrize("layout,reference", [
    ("pp2_training", "reference_training"),  # GPT-2 style: the embedding is tied, a copy on each end
    ("pp2_zero0_training", "reference_training"),
    ("pp2_tp2_sequence_parallel_training", "reference_training"),
    ("pp2_dp2_zero1_training", "reference_training"),
    ("pp2_activation_checkpointing_training", "reference_training"),
    ("pp4_training", "reference_training_four_layers"),
    ("pp2_interleaved_training", "reference_training_four_layers"),
    ("pp2_training_llama_style", "reference_training_llama_style"),
    ("moe_pp2_ep2_training", "moe_reference_training"),
])
def test_pipelined_loss_curve_matches_one_process(scenario_results, layout, reference):
    """Loss (from the last stage), global grad norm (over every stage, the tied copy counted once) and lr."""
    expected = scenario_results(reference)
    assert expected[-1]["loss"] < expected[0]["loss"], "the reference itself must learn"
    assert_training_matches(expected, scenario_results(layout), tol=LOSS_CURVE_TOL)


def test_pipelined_bf16_trains_as_bf16_does_without_a_pipeline(scenario_results):
    """bf16 at ZeRO-1 accumulates each micro-batch's gradients in fp32 through the pipeline as without one:
    a micro-batch summed again at every later backward (DeepSpeed's bf16 optimizer, handed .grad not cleared)
    trebled the gradient norm."""
    fp32, bf16 = scenario_results("reference_training"), scenario_results("pp2_bf16_training")
    plain_bf16 = scenario_results("dp2_zero1_bf16_grad_accum_training")
    for ref, got, plain in zip(fp32, bf16, plain_bf16):
        assert abs(got["loss"] - ref["loss"]) < 5e-3 * ref["loss"], f"step {ref['step']}"
        assert abs(got["grad_norm"] - plain["grad_norm"]) < 0.01 * plain["grad_norm"], f"step {ref['step']}"


def test_tied_embedding_copies_stay_equal_and_count_once(scenario_results):
    """The first stage's embedding and the last stage's copy get the summed gradient and stay the same
    bits; the run reports the whole model's parameters, the copy counted once."""
    tied = scenario_results("pp2_tied_embedding_copies")
    assert tied["moved"] and tied["equal"]
    assert tied["counts"] == tied["whole_model"]


def test_moe_figures_of_every_stage_are_logged(scenario_results):
    """Rank 0 (the first stage) logs the MoE layers of every stage, by their index in the model."""
    record = scenario_results("moe_pp2_ep2_training")[0]
    assert [layer["layer"] for layer in record["moe"]] == [0, 1]


@pytest.mark.parametrize("layout", ["eval_gpt_pp2", "eval_gpt_pp2_tp2_sequence_parallel"])
def test_held_out_loss_through_a_pipeline_matches_one_process(scenario_results, layout):
    """The same checkpoint's validation loss, scored on the last stage and summed over DP, within 1e-5."""
    from tests.test_evaluation import EVAL_TOL

    expected, got = scenario_results("eval_gpt_reference"), scenario_results(layout)
    assert got["eval_tokens"] == expected["eval_tokens"] > 0
    assert abs(got["eval_loss"] - expected["eval_loss"]) <= EVAL_TOL, (got, expected)


def test_a_pipelined_run_logs_the_last_stages_loss_once_as_one_process_logs_it(tmp_path):
    """`parallax train` at PP=2 on the real data pipeline: its first line names the schedule, it warns that one
    micro-batch leaves half of each step idle, and rank 0 (the first stage) logs the loss the last stage
    computed, the held-out loss and the same figures to TensorBoard, equal to one process's run."""
    import json
    import subprocess
    import sys

    from tests.test_tensorboard import events, scalars

    def train(run_dir, *args):
        proc = subprocess.run([sys.executable, "-c", "from launcher.cli import main; main()", "train",
                               "configs/gpt-tiny.yaml", "model.num_layers=2", "train.steps=3", "train.micro_batch_size=2",
                               "logging.interval=1", "checkpoint.interval=0", "train.eval_batches=2",
                               f"logging.run_dir={run_dir}", *args], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return proc.stdout, records

    _, alone = train(tmp_path / "one", "--nproc", "1")
    out, piped = train(tmp_path / "pp2", "--nproc", "2", "parallel.pp=2")
    assert "world=2 tp=1 ep=1 pp=2 dp=1 schedule=1f1b micro_batches=1 stage_layers=[1, 1] bubble=50.0%" in out
    assert "warning: train.grad_accum=1 micro-batches fill fewer than the parallel.pp=2 stages: the pipeline idles " \
           "50% of each step" in out
    assert [r["step"] for r in piped] == [r["step"] for r in alone] == [0, 1, 2, 3, 3]  # eval, 3 steps, eval
    tb = events(tmp_path / "pp2" / "tensorboard")
    for ours, theirs in zip(piped, alone):
        if "loss" in ours:
            assert abs(ours["loss"] - theirs["loss"]) <= LOSS_CURVE_TOL and ours["loss"] > 0
            assert scalars(tb, "train/loss")[ours["step"]] == pytest.approx(ours["loss"], rel=1e-6)
        else:
            assert abs(ours["eval_loss"] - theirs["eval_loss"]) <= 1e-5
