"""The training loop: build the groups, the model, the engine and the data, then step.

The loop owns every decision: when to read the step figures, when to save, when to stop, and
what a failed save means. The components it calls only do their job.
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from data_pipeline import build_dataloader
from data_pipeline.fact_task import FactTask, FactTaskLoader
from launcher.config import ConfigError, RunConfig
from launcher.errors import SaveFailed, TrainingDiverged
from launcher.curriculum import MemoryCurriculum
from launcher.evaluate import evaluator_for_run
from launcher.faults import Faults
from launcher.output_paths import output_directory
from launcher.run_log import RunLog
from launcher.profiling import StepProfiler
from launcher.spikes import SpikeDetector
from launcher.step_metrics import StepMetrics
from launcher.stopping import StopRequested, StopVote
from launcher.stragglers import StragglerReport
from launcher.tensorboard_log import TensorBoardLog
from launcher.watchdog import HangWatchdog
from models import build_model
from models.blocks import IGNORE_INDEX
from models.huggingface import import_directory
from parallel.checkpoint import Checkpointer, Resumed, checkpoints_newest_first, load_full_state
from parallel.engine import build_engine, building_model, loss_scale
from parallel.pipeline import moe_metrics_of_every_stage, stage_options, step_runner, whole_model_parameter_counts
from parallel.pipeline.tied import mark_tied_copy
from parallel.topology import Topology, init_topology

BatchSource = Callable[[Topology], Iterable[torch.Tensor | dict[str, torch.Tensor]]]


def train(cfg: RunConfig, batches: Optional[BatchSource] = None, records: Optional[list] = None) -> None:
    """Pretrain for cfg.train.steps optimizer steps.

    `batches` gives each rank its batches: for GPT [micro_batch, seq_len + 1] token windows, for T5
    dicts of input_ids, decoder_input_ids and labels; by default the data pipeline's loader for this
    rank's data-parallel shard. The model turns a batch into its forward's keyword arguments
    (`batch_inputs`), so this loop is the same for both. Every TP peer gets the same batches.
    Checkpoints need a source with the loader's `state_dict()`/`load_state_dict(states)`; a plain
    iterable trains without saving, resuming or stopping early. A run that stops early (signal,
    train.stop_at_step) raises StopRequested after its checkpoint.

    Every step's record goes to RUN_DIR/metrics.jsonl (rank 0) and, when `records` is given, is
    appended to it: the loop itself keeps none.
    """
    p = cfg.parallel
    topo = init_topology(tp=p.tp, ep=p.ep, pp=p.pp, timeout_minutes=p.timeout_minutes)
    if cfg.train.precision == "fp16" and topo.device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs CUDA (DeepSpeed's loss scaler); use bf16 or fp32 on CPU")
    if topo.is_logging_rank:  # the one rank that writes it, before the seconds of building, not after
        output_directory(cfg.logging.run_dir, "logging.run_dir")
        (Path(cfg.logging.run_dir) / TrainingDiverged.MARKER).unlink(missing_ok=True)  # a launch starts afresh
    if cfg.checkpoint.dir:  # every rank writes its shard there, first at the first save: hours in, maybe
        output_directory(cfg.checkpoint.dir, "checkpoint.dir")
    vocab_size = cfg.check_vocab_size(tokenized=batches is None or cfg.train.eval_interval > 0)
    evaluate = evaluator_for_run(cfg, topo) if cfg.train.eval_interval else None
    curriculum = MemoryCurriculum(cfg) if cfg.model.memory is not None or cfg.data.fact_task is not None else None
    _seed_everything(cfg.train.seed)
    model, engine = build_model_and_engine(cfg, topo, vocab_size, init_from=cfg.model.init_from)
    faults = Faults.from_env(topo.rank)  # tests' injected failures (launcher/faults.py); none in a real run
    faults.install(model)
    runner = step_runner(engine, cfg, topo)
    if batches is None and cfg.data.fact_task is not None:
        loader = FactTaskLoader(
            FactTask.build(cfg.data, cfg.task_segment_len(), cfg.train.seed, held_out=False), curriculum.segments_at,
            micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum, dp_rank=topo.dp_rank,
            dp_size=topo.dp, last_tokens=None if cfg.model.memory is not None else cfg.data.seq_len)
    elif batches is None:
        loader = build_dataloader(
            cfg.data, micro_batch_size=cfg.train.micro_batch_size, dp_rank=topo.dp_rank, dp_size=topo.dp,
            seed=cfg.train.seed,
        )
    else:
        loader = batches(topo)
    checkpoints = Checkpointer(cfg, topo, engine, loader) if hasattr(loader, "state_dict") else None
    resumed = checkpoints.resume() if checkpoints else Resumed()
    stream = iter(loader) if topo.reads_batches else None  # a pipeline stage between the ends reads no data

    run_dir = Path(cfg.logging.run_dir)
    total, active = whole_model_parameter_counts(model, topo)
    if topo.is_logging_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        print(f"parallax: {topo.describe()}{_schedule(cfg)} zero={p.zero_stage} precision={cfg.train.precision} "
              f"parameters={total / 1e6:.2f}M active/token={active / 1e6:.2f}M run_dir={run_dir}", flush=True)
        if p.pp > cfg.train.grad_accum:
            print(f"parallax: warning: train.grad_accum={cfg.train.grad_accum} micro-batches fill fewer than the "
                  f"parallel.pp={p.pp} stages: the pipeline idles {cfg.pipeline_bubble():.0%} of each step; raise "
                  f"train.grad_accum to {4 * p.pp} or more (and lower train.micro_batch_size to keep the batch)",
                  flush=True)
    log = RunLog(run_dir, cfg.train.steps, enabled=topo.is_logging_rank,
                 tensorboard=TensorBoardLog.open(cfg, topo, vocab_size, first_step=resumed.step + 1))
    sequences_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * topo.dp
    metrics = StepMetrics(topo, micro_batches_per_step=cfg.train.grad_accum, data_wait=_data_wait(loader))

    first_step, tokens_seen = resumed.step + 1, resumed.tokens
    first_loss = last_loss = None
    pending_save = None  # the checkpoint being written in the background while training goes on
    dropped = {step for first, last in cfg.train.skip_batches for step in range(first, last + 1)}
    spikes = SpikeDetector(cfg.train.spike) if cfg.train.spike and checkpoints else None
    bad_in_a_row = 0  # steps skipped for a non-finite loss or gradient norm, up to this one
    lowered_lr = range(0)  # the steps after a spike's rollback that train at train.spike.lr_factor
    watchdog = HangWatchdog(run_dir, topo.rank, topo.world_size, cfg.train.hang_seconds)
    stragglers = StragglerReport(topo, cfg.logging.straggler_factor)
    profiler = StepProfiler(cfg.train.profile_steps, run_dir, topo.rank, topo.device)
    step = first_step
    try:
        if evaluate and first_step == 1:
            watchdog.beat(0, "evaluation")
            _log_evaluation(evaluate(runner, step=0), log, records)
            metrics.restart_clock(_data_wait(loader))
        while step <= cfg.train.steps:
            stop_vote = StopVote(topo.control_group) if checkpoints else None  # travels while the step computes
            watchdog.beat(step, "start")
            stragglers.begin_step()
            profiler.begin_step(step)
            faults.begin_step(step)
            if step in lowered_lr:
                _scale_lr(engine, cfg.train.spike.lr_factor)
            lr = engine.get_lr()[0]
            micro_batches = [{name: tensor.to(topo.device) for name, tensor in model.batch_inputs(
                curriculum.window(next(stream), step) if curriculum else next(stream)).items()}
                for _ in range(cfg.train.grad_accum)] if stream is not None else []
            if step in dropped:  # read and dropped, as a spike's rollback drops it: no forward, no update
                loss_sum, skipped = torch.full((), float("nan"), device=topo.device), "dropped"
            else:
                watchdog.beat(step, "forward/backward/optimizer step")
                skipped_before = engine.skipped_steps  # the engine's optimizer skips a non-finite step on every rank
                loss_sum = runner.train_step(micro_batches, **per_token_loss(micro_batches, topo, cfg))
                skipped = "non-finite" if engine.skipped_steps > skipped_before else None
            stragglers.end_step()
            profiler.end_step(step)
            bad_in_a_row = bad_in_a_row + 1 if skipped == "non-finite" else 0
            diverged = bad_in_a_row >= cfg.train.max_bad_steps
            segments = curriculum.segments_at(step) if curriculum else None
            tokens = sequences_per_step * (segments * curriculum.segment_len if curriculum else cfg.data.seq_len)
            grad_norm = None if skipped == "dropped" else engine.get_global_grad_norm()
            metrics.add(step, loss_sum, lr, grad_norm, loss_scale(engine), tokens, segments, skipped)
            tokens_seen += tokens

            stop_signal = stop_vote.received() if stop_vote else None
            stopping = checkpoints is not None and (stop_signal is not None or step == cfg.train.stop_at_step)
            last = step == cfg.train.steps
            # no save mid-streak of non-finite steps: the checkpoints from before it are the ones to keep
            save = checkpoints is not None and not diverged and (stopping or last or (
                cfg.checkpoint.interval > 0 and step % cfg.checkpoint.interval == 0 and skipped != "non-finite"))
            evaluating = evaluate is not None and (last or step % cfg.train.eval_interval == 0)
            if not (save or evaluating or last or diverged or step == first_step or step % cfg.logging.interval == 0):
                step += 1
                continue
            watchdog.beat(step, "logging")
            step_records = metrics.read(_data_wait(loader), moe_metrics_of_every_stage(model, topo))
            figures, straggler = stragglers.read()
            step_records[-1].update(figures)
            _say_health(log, step_records, straggler, cfg)
            if spikes and (spike := spikes.first_spike(step_records)):
                log.write(step_records)
                first_dropped, last_dropped = spikes.dropped_steps(spike["step"])
                back = checkpoints.roll_back(before_step=first_dropped)
                if back is not None:
                    dropped.update(range(first_dropped, last_dropped + 1))
                    spikes.rolled_back_to(back.step)
                    log.rollback(spike, spikes.median(), back.step, (first_dropped, last_dropped))
                    step, tokens_seen, bad_in_a_row = back.step + 1, back.tokens, 0
                    lowered_lr = range(last_dropped + 1, last_dropped + 1 + cfg.train.spike.lr_steps)
                    stream = iter(loader) if topo.reads_batches else None  # the loader is back at that step too
                    metrics.restart_clock(_data_wait(loader))
                    continue
                log.say(f"warning: loss spike at step {spike['step']} ({spike['loss']:.4f}) but no checkpoint from "
                        f"before step {first_dropped} to roll back to: going on")
            if evaluating:
                watchdog.beat(step, "evaluation")
            evaluation = evaluate(runner, step) if evaluating else None
            if stopping and not last:
                log.say(f"stopping after step {step} ({stop_signal.name if stop_signal else 'train.stop_at_step'}): "
                        "saving a checkpoint")
            if save:
                watchdog.beat(step, "saving")
                save_started = time.perf_counter()
                if pending_save is not None and (error := pending_save.wait()):  # one save at a time
                    log.say(f"warning: {error}; training continues and saves again at the next interval")
                pending_save = checkpoints.save(step, tokens_seen)  # blocks only while it copies to CPU memory
                # The run must not end ("done", or "requeue me") before its last checkpoint is known committed.
                if (stopping or last) and (error := pending_save.wait()):
                    raise SaveFailed(f"{error}; free space or fix permissions on {checkpoints.root} and launch again")
                step_records[-1]["checkpoint_save_seconds"] = time.perf_counter() - save_started
            log.write(step_records)
            if records is not None:
                records.extend(step_records)
            if evaluation:
                _log_evaluation(evaluation, log, records)
            metrics.restart_clock(_data_wait(loader))  # throughput counts training: not evaluating, saving or logging
            losses = [record["loss"] for record in step_records if record["loss"] is not None]  # none: batches dropped
            first_loss = losses[0] if first_loss is None and losses else first_loss
            last_loss = losses[-1] if losses else last_loss
            if diverged:
                raise _diverged(step, cfg, run_dir, checkpoints, pending_save, topo)
            if stopping and not last:
                raise StopRequested(step)
            step += 1
    finally:
        watchdog.stop()  # a finished run's thread must never fire: tests train many runs in one process

    summary = f"loss {first_loss:.3f} -> {last_loss:.3f}" if first_loss is not None else "nothing left to train"
    log.close(f"parallax: done: {cfg.train.steps} steps, {summary}, run dir {run_dir}")


def build_model_and_engine(cfg: RunConfig, topo: Topology, vocab_size: int, *, init_from: Optional[Path]):
    """The model, drawn from the seed or read from the Hugging Face directory `init_from`, built as
    the engine trains it (on the device, in its precision, partitioned at ZeRO-3), and the DeepSpeed
    engine around it."""
    p = cfg.parallel
    with building_model(cfg, topo):
        model = build_model(
            cfg.model, vocab_size, sequence_parallel=p.sequence_parallel,
            activation_checkpointing=p.activation_checkpointing, expert_parallel_size=p.ep,
            **stage_options(cfg, topo),
        )
    mark_tied_copy(model, topo)
    if init_from is not None:  # a checkpoint resumed later overwrites these weights: it wins
        load_full_state(model, import_directory(init_from, cfg.model).state, topo)
    return model, build_engine(model, cfg, topo)


def _schedule(cfg: RunConfig) -> str:
    """The pipeline schedule, for the run's first line; nothing without a pipeline."""
    p = cfg.parallel
    if p.pp == 1:
        return ""
    schedule = f"interleaved-1f1b(virtual_stages={p.virtual_stages})" if p.virtual_stages > 1 else "1f1b"
    return (f" schedule={schedule} micro_batches={cfg.train.grad_accum} "
            f"stage_layers={[len(layers) for layers in cfg.stage_layers()]} bubble={cfg.pipeline_bubble():.1%}")


def _diverged(step: int, cfg: RunConfig, run_dir: Path, checkpoints, pending_save, topo: Topology) -> TrainingDiverged:
    """The run's last line, left in RUN_DIR for an automatic restart to stop on (launcher/entry.py)."""
    if pending_save is not None:
        pending_save.wait()
    newest = checkpoints_newest_first(checkpoints.root) if checkpoints else []
    where = f"its last checkpoint, {newest[0]}, is from before them" if newest else "no checkpoint was saved"
    error = TrainingDiverged(
        f"steps {step - cfg.train.max_bad_steps + 1}-{step} all had a non-finite loss or gradient norm "
        f"(train.max_bad_steps={cfg.train.max_bad_steps}) and were skipped; {where}. Lower optim.lr, or resume "
        "past the bad data with train.skip_batches")
    if topo.is_logging_rank:
        (run_dir / TrainingDiverged.MARKER).write_text(f"{error}\n")
    return error


def _say_health(log: RunLog, step_records: list[dict], straggler: Optional[int], cfg: RunConfig) -> None:
    """A line for each step skipped as non-finite since the last logging step, and one naming a straggler."""
    for record in step_records:
        if record.get("skipped") == "non-finite":
            log.say(f"step {record['step']} skipped on every rank: non-finite loss or gradient norm "
                    f"({record['skipped_steps']} so far; train.max_bad_steps={cfg.train.max_bad_steps} in a row stop "
                    "the run)")
    if straggler is not None:
        figures = step_records[-1]
        log.say(f"warning: rank {straggler} is a straggler: {figures['rank_cpu_seconds_max']:.3f} CPU s per step "
                f"against a median of {figures['rank_cpu_seconds_median']:.3f} "
                f"(logging.straggler_factor={cfg.logging.straggler_factor:g})")


def _scale_lr(engine, factor: float) -> None:
    """This step's learning rate is `factor` x the scheduled one; the scheduler computes the next from its own
    count, so the lowering ends when the loop stops asking for it."""
    scheduler = engine.lr_scheduler
    for group, scheduled in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = scheduled * factor


def _log_evaluation(record: dict, log: RunLog, records: Optional[list]) -> None:
    log.evaluation(record)
    if records is not None:
        records.append(record)


def _seed_everything(seed: int) -> None:
    # The same seed on every rank: TP peers must draw the same full weights (each keeps its slice),
    # and DP replicas must start identical.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def per_token_loss(micro_batches: list[dict], topo: Topology, cfg: RunConfig) -> dict:
    """Masked LM scores a different number of tokens in each micro-batch, so a mean of the micro-batches' means
    (what the engine's averaging over DP ranks and micro-batches gives) would weigh a token by its micro-batch's
    count, and depend on the layout. The step's loss is instead every scored token's loss over their count in
    the whole step: each micro-batch's summed loss weighed by loss_weight, dp x micro-batches / that count, which
    the engine's averaging brings back to 1 / count. Other objectives score the same number in every micro-batch
    (their mean is already per token): {}."""
    if cfg.data.masked_lm is None:
        return {}
    scored = sum((inputs["labels"] != IGNORE_INDEX).sum() for inputs in micro_batches).double()
    topo.sum_scored(scored)
    return {"loss_weight": len(micro_batches) * topo.dp / scored.clamp(min=1)}


def _data_wait(loader) -> float:
    """Seconds this rank has so far spent blocked on its data loader (0 for a plain batch source)."""
    return getattr(loader, "data_wait_seconds", 0.0)


