"""Issue 29: a non-finite step is skipped on every rank, too many in a row stop the run, a loss spike rolls back;
each shown on real ranks with faults injected through PARALLAX_FAULTS (tests/distributed/scenarios_health.py),
against a run told from the start to drop the same batches (train.skip_batches)."""
import json
import math
import os
import subprocess
import sys

import pytest

from launcher.errors import DIVERGED_EXIT_CODE
from launcher.faults import parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARALLAX = [sys.executable, "-c", "from launcher.cli import main; main()"]


def figures(records: list[dict], *names: str) -> list[tuple]:
    return [tuple(record.get(name) for name in ("step", *names)) for record in records]


@pytest.mark.parametrize("name", ["nan_loss_skipped_dp2_zero0", "nan_grad_skipped_dp2_zero2",
                                  "nan_loss_skipped_dp2_zero3_bf16"])
def test_a_non_finite_step_is_skipped_everywhere_and_the_run_ends_as_one_that_dropped_its_batch(scenario_results,
                                                                                                name):
    """Rank 1 of DP=2 meets a NaN at step 3 (in its loss, or in its gradients only): no rank updates, and every
    later step's loss, gradient norm and learning rate equal, bitwise, those of the run that drops step 3's batch:
    the weights, the Adam moments and the LR schedule were left as they were."""
    result = scenario_results(name)
    skipped, dropped = result["skipped"], result["dropped"]
    assert skipped[2]["skipped"] == "non-finite" and skipped[2]["skipped_steps"] == 1
    assert dropped[2]["skipped"] == "dropped" and dropped[2]["loss"] is dropped[2]["grad_norm"] is None
    later = [record for record in skipped if record["step"] != 3]
    assert figures(later, "loss", "grad_norm", "lr") == figures(
        [record for record in dropped if record["step"] != 3], "loss", "grad_norm", "lr")
    assert all(math.isfinite(record["loss"]) for record in later)
    assert later[-1]["loss"] < later[0]["loss"]  # it trained


def test_max_bad_steps_in_a_row_stop_the_run_and_leave_the_last_good_checkpoint(scenario_results):
    result = scenario_results("bad_steps_in_a_row_stop_the_run")
    assert result["error"].startswith("steps 4-6 all had a non-finite loss or gradient norm (train.max_bad_steps=3)")
    assert "step-00000002, is from before them" in result["error"]
    assert result["checkpoints"] == ["step-00000002"], "no checkpoint is saved in a streak of skipped steps"
    assert result["marker"].strip() == result["error"]


def test_a_loss_spike_rolls_back_and_the_run_ends_as_one_told_to_drop_those_batches(scenario_results):
    result = scenario_results("spike_rolled_back")
    rollbacks = [json.loads(line) for line in result["metrics"] if "rolled_back_to" in line]
    assert rollbacks == [{"step": 6, "spike_loss": rollbacks[0]["spike_loss"], "spike_median": rollbacks[0]["spike_median"],
                          "rolled_back_to": 4, "dropped_batches": [5, 6]}]
    assert rollbacks[0]["spike_loss"] > 3 * rollbacks[0]["spike_median"]
    assert figures(result["rolled_back"], "loss", "grad_norm", "lr", "skipped") == figures(
        result["dropped"], "loss", "grad_norm", "lr", "skipped")
    assert [record["step"] for record in result["rolled_back"]] == list(range(1, 9))
    lowered, scheduled = result["lowered_lr"], result["dropped"]
    assert lowered[6]["lr"] == scheduled[6]["lr"] / 2 and lowered[7]["lr"] == scheduled[7]["lr"]  # steps 7 and 8
    assert lowered[6]["loss"] == scheduled[6]["loss"] and lowered[7]["loss"] != scheduled[7]["loss"]


def test_a_diverged_run_exits_with_its_code_in_one_line_and_a_restart_does_not_train_into_it_again(tmp_path):
    """Real `parallax train`, 2 ranks, --max-restarts 1: the restarted round stops at once, silently."""
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    env["PARALLAX_FAULTS"] = "nan_loss@2:0;nan_loss@3:0"
    proc = subprocess.run([*PARALLAX, "train", "configs/gpt-tiny.yaml", "--nproc", "2", "--max-restarts", "1",
                           "model.num_layers=1", "train.steps=6", "train.max_bad_steps=2", "checkpoint.interval=1",
                           f"logging.run_dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("parallax: error")]
    assert proc.returncode == DIVERGED_EXIT_CODE, (proc.stdout + proc.stderr)[-3000:]
    assert errors == [f"parallax: error: steps 2-3 all had a non-finite loss or gradient norm (train.max_bad_steps=2) "
                      f"and were skipped; its last checkpoint, {tmp_path / 'run' / 'checkpoints' / 'step-00000001'}, "
                      "is from before them. Lower optim.lr, or resume past the bad data with train.skip_batches"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == ["step-00000001"]


def test_the_fault_switch_is_one_line_when_misspelt():
    assert parse("nan_loss@3:1; delay@2:0:0.5") == parse("nan_loss@3:1;delay@2:0:0.5")
    with pytest.raises(ValueError, match="'nan@3:1' is not KIND@STEP:RANK"):
        parse("nan@3:1")
