"""Issue 26's evaluation on data.fact_task: reading a sample a segment at a time scores what the whole forward
scores, holds as much at its last segment as at its eighth, and gives the same figures at every layout.

The model is configs/rmt-fact-tiny.yaml at hidden size 64, untrained: the evaluation's arithmetic, not the
model's skill, is under test (bench/memory.py measures the skill).
"""
import gc

import torch

from tests.distributed.harness import scenario

SEGMENTS, SAMPLES = 3, 12
HELD_AT = (8, 16, 24, 32, 40, 48, 56, 63)  # the segments after which the live bytes are counted: ~1 s each
SMALL = ("model.hidden_size=64", "train.micro_batch_size=4", f"data.fact_task.eval_samples={SAMPLES}",
         f"data.fact_task.eval_segments=[{SEGMENTS}]")


def _evaluation(*overrides: str, on_segment=None, counts=None) -> tuple[dict, object, object]:
    """The evaluator's record, the model and the evaluator, with the engine of `overrides`' layout."""
    from launcher.config import load_config
    from launcher.evaluate_fact_task import FactTaskEvaluator
    from launcher.train import build_model_and_engine
    from parallel.pipeline import step_runner
    from parallel.topology import init_topology

    cfg = load_config("configs/rmt-fact-tiny.yaml", [*SMALL, *overrides])
    topo = init_topology(tp=cfg.parallel.tp)
    torch.manual_seed(cfg.train.seed)
    _, engine = build_model_and_engine(cfg, topo, cfg.check_vocab_size(), init_from=None)
    evaluator = FactTaskEvaluator(cfg, topo, counts or [SEGMENTS])
    return evaluator(step_runner(engine, cfg, topo), step=0, on_segment=on_segment), engine.module, evaluator


def _live_tensor_bytes() -> int:
    """Bytes of every tensor storage Python can reach: what a reader that kept its segments would grow."""
    gc.collect()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in gc.get_objects() if isinstance(t, torch.Tensor)}
    return sum(storages.values())


@scenario(world_size=1)
def fact_task_eval_reference():
    """One process: the streamed figures, the whole forward's, and the live tensor bytes after eight of 64
    segments."""
    from models.blocks import language_model_loss

    record, model, evaluator = _evaluation("parallel.zero_stage=0")
    batch = evaluator.task.batch(range(SAMPLES), SEGMENTS)
    with torch.no_grad():
        logits = model.eval()(batch["input_ids"])[-1:]  # [1, b, vocab]: the question's last token, whole forward
    answers = batch["labels"][:, -1:]
    loss, _ = language_model_loss(logits, answers, reduction="sum")
    accuracy = (logits[0].argmax(-1) == answers[:, 0]).double().mean().item()

    held = {}

    def count_live_bytes(segments, segment):
        if segment in HELD_AT:
            held[segment] = _live_tensor_bytes()

    _evaluation("parallel.zero_stage=0", counts=[64], on_segment=count_live_bytes)
    return {"streamed": record["by_segments"][0], "whole_loss": loss.item() / SAMPLES, "whole_accuracy": accuracy,
            "held_bytes": held}


@scenario(world_size=2)
def fact_task_eval_layouts():
    """The same evaluation at TP=2 and at DP=2 under ZeRO-3 (the parameters gathered whole for it)."""
    return {layout: _evaluation(*overrides)[0]["by_segments"][0] for layout, overrides in (
        ("tp2", ("parallel.tp=2", "parallel.zero_stage=1")), ("dp2_zero3", ("parallel.zero_stage=3",)))}
