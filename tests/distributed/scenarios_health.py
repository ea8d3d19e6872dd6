"""Issue 29's scenarios on two real ranks: a non-finite step is skipped everywhere, too many in a row stop the run,
and a loss spike rolls back. Faults are injected through PARALLAX_FAULTS (launcher/faults.py), set around the
run; each run is compared with one told from the start to drop the same batches (train.skip_batches)."""
import contextlib
import os

from tests.distributed.harness import scenario
from tests.distributed.scenarios_checkpoint import ResumableBatches, layout, run_dir

STEPS = 8


@contextlib.contextmanager
def faults(spec: str):
    os.environ["PARALLAX_FAULTS"] = spec
    try:
        yield
    finally:
        del os.environ["PARALLAX_FAULTS"]


def health_run(name: str, *overrides: str) -> list[dict]:
    """The checkpoint scenarios' tiny GPT on fixed batches, from scratch, every step logged."""
    from launcher.train import train
    from tests.distributed.scenarios import tiny_config

    cfg = tiny_config(f"train.steps={STEPS}", "logging.interval=1", f"logging.run_dir={run_dir(name)}",
                      "checkpoint.resume=none", *overrides)
    records = []
    train(cfg, batches=lambda topo: ResumableBatches(cfg, topo), records=records)
    return records


def skipped_and_dropped(name: str, fault: str, *overrides: str) -> dict:
    """A run whose step 3 meets `fault` on rank 1, and one that drops step 3's batch from the start."""
    with faults(fault):
        skipped = health_run(f"{name}-fault", *overrides)
    return {"skipped": skipped, "dropped": health_run(f"{name}-dropped", "train.skip_batches=[[3, 3]]", *overrides)}


@scenario(world_size=2)
def nan_loss_skipped_dp2_zero0():
    """ZeRO-0 in fp32: no DeepSpeed optimizer sits before AdamW; Parallax's adapter skips the step."""
    return skipped_and_dropped("nan-zero0", "nan_loss@3:1", *layout(1, 2, 0))


@scenario(world_size=2)
def nan_grad_skipped_dp2_zero2():
    return skipped_and_dropped("nan-zero2", "nan_grad@3:1", *layout(1, 2, 2))


@scenario(world_size=2)
def nan_loss_skipped_dp2_zero3_bf16():
    return skipped_and_dropped("nan-zero3-bf16", "nan_loss@3:1", "train.precision=bf16", *layout(1, 2, 3))


@scenario(world_size=2)
def bad_steps_in_a_row_stop_the_run():
    """Steps 4-6 are NaN on rank 0 with train.max_bad_steps=3; checkpoints every 2 steps (step 4's and 6's fall in
    the streak, so step 2's is the last)."""
    from launcher.errors import TrainingDiverged

    name = "diverged"
    with faults("nan_loss@4:0;nan_loss@5:0;nan_loss@6:0"):
        try:
            health_run(name, "train.max_bad_steps=3", "checkpoint.interval=2", *layout(1, 2, 0))
            error = None
        except TrainingDiverged as diverged:
            error = str(diverged)
    marker = run_dir(name) / TrainingDiverged.MARKER
    return {"error": error, "checkpoints": sorted(p.name for p in (run_dir(name) / "checkpoints").glob("step-*")),
            "marker": marker.read_text() if marker.exists() else None}


@scenario(world_size=2)
def spike_rolled_back():
    """Rank 0's loss is 100x at step 6: with logging every 2 steps the spike is seen at step 6, the run goes back to
    step 4's checkpoint (the newest before the dropped steps 5-6) and drops their batches. The other run drops
    them from the start."""
    spike = ("train.spike={factor: 3, window: 3, skip: 2}", "checkpoint.interval=2", "logging.interval=2")
    with faults("spike@6:0:100"):
        rolled_back = health_run("spike", *spike, *layout(1, 2, 1))
    metrics = (run_dir("spike") / "metrics.jsonl").read_text().splitlines()
    with faults("spike@6:0:100"):
        lowered = health_run("spike-lowered-lr", "train.spike={factor: 3, window: 3, skip: 2, lr_factor: 0.5, "
                             "lr_steps: 1}", *spike[1:], *layout(1, 2, 1))
    return {"rolled_back": rolled_back, "metrics": metrics, "lowered_lr": lowered,
            "dropped": health_run("spike-dropped", "train.skip_batches=[[5, 6]]", "checkpoint.interval=2",
                                  *layout(1, 2, 1))}
