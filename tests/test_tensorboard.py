"""Issue 7 points 5-7: TensorBoard events of a real `parallax train` run, read back with
TensorBoard's own event reader; every derived figure is checked against the others and against the
FLOPs formula written in the README, computed here independently of the code under test."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

PARALLAX = [sys.executable, "-c", "from launcher.cli import main; main()"]
STEPS, INTERVAL = 8, 4
SEQUENCES, SEQ_LEN, LAYERS, HIDDEN, VOCAB = 8, 128, 2, 256, 8192  # micro-batch 4 x DP 2; gpt-tiny's widths
EVERY_STEP = {"train/loss", "train/lr", "train/grad_norm", "train/skipped_steps"}
PER_LOGGING_STEP = {"throughput/tokens_per_s", "throughput/tokens_per_s_per_device", "throughput/samples_per_s",
                    "throughput/tflops_per_device", "throughput/mfu", "time/step_seconds", "time/data_wait_fraction",
                    "memory/rss_gib", "stragglers/rank_cpu_seconds_median", "stragglers/rank_cpu_seconds_max",
                    "stragglers/slowest_rank"}


def parallax_train(run_dir: Path, config: str, *overrides: str) -> None:
    proc = subprocess.run([*PARALLAX, "train", config, "--nproc", "2", "model.num_layers=2", "logging.interval=1000",
                           f"logging.run_dir={run_dir}", *overrides], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def events(events_dir: Path) -> EventAccumulator:
    files = [p for p in events_dir.iterdir() if p.is_file()]
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents"), files
    accumulator = EventAccumulator(str(events_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def text(accumulator: EventAccumulator, tag: str) -> str:
    return accumulator.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode()


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("dense")
    parallax_train(run_dir, "configs/gpt-tiny.yaml", f"train.steps={STEPS}", f"checkpoint.interval={INTERVAL}")
    return run_dir


def test_only_rank_0_writes_every_tag(dense):
    """Training figures at every step; time, throughput and memory at the logging steps, which here
    (logging.interval 1000) are the first step and the steps that save."""
    assert [p.name for p in (dense / "tensorboard").iterdir() if p.is_dir()] == [], "no per-rank writers by default"
    tb = events(dense / "tensorboard")
    tags = set(tb.Tags()["scalars"])
    assert tags == EVERY_STEP | PER_LOGGING_STEP | {"throughput/peak_tflops_per_device", "time/checkpoint_save_seconds",
                                                    "eval/loss", "eval/ppl"}
    for tag in EVERY_STEP:
        assert sorted(scalars(tb, tag)) == list(range(1, STEPS + 1)), tag
    for tag in PER_LOGGING_STEP:
        assert sorted(scalars(tb, tag)) == [1, INTERVAL, STEPS], tag
    assert "num_layers: 2" in text(tb, "config") and "world=2 tp=1 ep=1 pp=1 dp=2" in text(tb, "layout")


def test_logged_figures_are_consistent_with_each_other_and_the_run(dense):
    tb = events(dense / "tensorboard")
    seconds = scalars(tb, "time/step_seconds")
    records = {r["step"]: r for r in map(json.loads, (dense / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    # Megatron's model FLOPs for a GPT with a 4h MLP, forward and backward (README):
    flops = 72 * SEQUENCES * SEQ_LEN * LAYERS * HIDDEN**2 * (
        1 + SEQ_LEN / (6 * HIDDEN) + VOCAB / (12 * LAYERS * HIDDEN))
    (peak,) = scalars(tb, "throughput/peak_tflops_per_device").values()
    for step, t in seconds.items():
        tokens_per_s = scalars(tb, "throughput/tokens_per_s")[step]
        assert tokens_per_s * t == pytest.approx(SEQUENCES * SEQ_LEN, rel=1e-5)
        assert scalars(tb, "throughput/tokens_per_s_per_device")[step] * 2 == pytest.approx(tokens_per_s, rel=1e-6)
        assert scalars(tb, "throughput/samples_per_s")[step] * t == pytest.approx(SEQUENCES, rel=1e-5)
        tflops = scalars(tb, "throughput/tflops_per_device")[step]
        assert tflops * 1e12 * 2 * t == pytest.approx(flops, rel=1e-5)
        assert scalars(tb, "throughput/mfu")[step] == pytest.approx(tflops / peak, rel=1e-5)
        for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
                         ("time/step_seconds", "step_seconds")):
            assert scalars(tb, tag)[step] == pytest.approx(records[step][key], rel=1e-6), tag
        assert 0 <= scalars(tb, "time/data_wait_fraction")[step] < 1
        assert 0.1 < scalars(tb, "memory/rss_gib")[step] < 16
    assert scalars(tb, "time/data_wait_fraction")[1] > 0, "the first step waits for the loader's worker"
    saves = scalars(tb, "time/checkpoint_save_seconds")
    assert sorted(saves) == [INTERVAL, STEPS] and all(s > 0 for s in saves.values())
    assert saves[STEPS] == pytest.approx(records[STEPS]["checkpoint_save_seconds"], rel=1e-6)
    assert 1e-3 < peak < 1e3, "a CPU core's matmul peak, in TFLOP/s"
    print(f"tokens/s x step time = {scalars(tb, 'throughput/tokens_per_s')[STEPS] * seconds[STEPS]:.3f} "
          f"(tokens per step {SEQUENCES * SEQ_LEN}); model FLOPs per step {flops:.4g}; CPU peak {peak * 1e3:.1f} GFLOP/s; "
          f"MFU at the last step {scalars(tb, 'throughput/mfu')[STEPS]:.1%}")


def test_evaluations_are_on_the_training_step_axis(dense):
    """configs/gpt-tiny.yaml evaluates before the first step and after the last (every 100 steps too)."""
    tb = events(dense / "tensorboard")
    evaluations = [r for r in map(json.loads, (dense / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [0, STEPS]
    for record in evaluations:
        assert scalars(tb, "eval/loss")[record["step"]] == pytest.approx(record["eval_loss"], rel=1e-6)
        assert scalars(tb, "eval/ppl")[record["step"]] == pytest.approx(record["eval_ppl"], rel=1e-6)
    assert evaluations[-1]["eval_loss"] < evaluations[0]["eval_loss"]


def test_every_rank_writes_its_own_events_with_moe_expert_load(tmp_path):
    parallax_train(tmp_path, "configs/gpt-moe-tiny.yaml", "train.steps=3", "checkpoint.interval=0",
                   "logging.tensorboard=every_rank", "logging.interval=1")
    root = tmp_path / "tensorboard"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["rank-00001"]
    for tb in (events(root), events(root / "rank-00001")):
        for step in (1, 2, 3):
            loads = [scalars(tb, f"moe/layer_1/expert_{e}_load")[step] for e in range(4)]
            assert sum(loads) == pytest.approx(1, rel=1e-5) and all(0 <= load <= 1 for load in loads)
            assert 0 <= scalars(tb, "moe/layer_1/dropped_fraction")[step] <= 1
        assert {"moe/layer_1/aux_loss", "moe/layer_1/z_loss", "memory/rss_gib"} <= set(tb.Tags()["scalars"])
        assert not any(tag.startswith("moe/layer_0/") for tag in tb.Tags()["scalars"]), "layer 0 is dense"
