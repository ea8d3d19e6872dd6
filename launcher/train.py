"""The training loop: build the groups, the model, the engine and the data, then step."""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline import build_dataloader, load_tokenizer
from launcher.config import ConfigError, RunConfig
from launcher.run_log import RunLog
from launcher.tensorboard_log import TensorBoardLog
from models import build_model
from parallel.checkpoint import Checkpointer, Resumed, StopRequested
from parallel.engine import build_engine, loss_scale
from parallel.topology import Topology, init_topology

BatchSource = Callable[[Topology], Iterable[torch.Tensor | dict[str, torch.Tensor]]]


def train(cfg: RunConfig, batches: Optional[BatchSource] = None) -> list[dict]:
    """Pretrain for cfg.train.steps optimizer steps and return one metrics record per step.

    `batches` gives each rank its batches: for GPT [micro_batch, seq_len + 1] token windows, for T5
    dicts of input_ids, decoder_input_ids and labels; by default the data pipeline's loader for this
    rank's data-parallel shard. The model turns a batch into its forward's keyword arguments
    (`batch_inputs`), so this loop is the same for both. Every TP peer gets the same batches.
    Checkpoints need a source with the loader's `state_dict()`/`load_state_dict(states)`; a plain
    iterable trains without saving or resuming. A run that stops early (signal, train.stop_at_step)
    raises StopRequested after its checkpoint; a resumed run returns only the steps it ran.
    """
    p = cfg.parallel
    topo = init_topology(tp=p.tp, ep=p.ep, pp=p.pp)
    if cfg.train.precision == "fp16" and topo.device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs CUDA (DeepSpeed's loss scaler); use bf16 or fp32 on CPU")
    _seed_everything(cfg.train.seed)
    vocab_size = cfg.model.vocab_size or load_tokenizer(cfg.data).get_vocab_size()
    model = build_model(
        cfg.model, vocab_size, sequence_parallel=p.sequence_parallel, activation_checkpointing=p.activation_checkpointing,
        expert_parallel_size=p.ep,
    )
    engine = build_engine(model, cfg, topo)
    if batches is None:
        loader = build_dataloader(
            cfg.data, micro_batch_size=cfg.train.micro_batch_size, dp_rank=topo.dp_rank, dp_size=topo.dp,
            seed=cfg.train.seed,
        )
    else:
        loader = batches(topo)
    checkpoints = Checkpointer(cfg, topo, engine, loader) if hasattr(loader, "state_dict") else None
    resumed = checkpoints.resume() if checkpoints else Resumed()
    stream = iter(loader)

    run_dir = Path(cfg.logging.run_dir)
    if topo.is_logging_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        total, active = model.parameter_counts()
        print(f"parallax: {topo.describe()} zero={p.zero_stage} precision={cfg.train.precision} "
              f"parameters={total / 1e6:.2f}M active/token={active / 1e6:.2f}M run_dir={run_dir}", flush=True)
    log = RunLog(run_dir, cfg.train.steps, cfg.logging.interval, enabled=topo.is_logging_rank,
                 tensorboard=TensorBoardLog.open(cfg, topo, vocab_size, first_step=resumed.step + 1))
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * topo.dp * cfg.data.seq_len

    history, tokens_seen = [], resumed.tokens
    for step in range(resumed.step + 1, cfg.train.steps + 1):
        started, waited_before = time.perf_counter(), _data_wait(loader)
        lr = engine.get_lr()[0]
        loss_sum = torch.zeros((), device=topo.device)
        for _ in range(cfg.train.grad_accum):
            inputs = model.batch_inputs(next(stream))
            loss = engine(**{name: tensor.to(topo.device) for name, tensor in inputs.items()})
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
        # Every rank of a DP group holds its own shard's loss; the run's loss is their mean.
        dist.all_reduce(loss_sum, group=topo.dp_group)
        step_seconds = time.perf_counter() - started
        record = {
            "step": step,
            "loss": loss_sum.item() / (cfg.train.grad_accum * topo.dp),
            "lr": lr,
            "grad_norm": _as_float(engine.get_global_grad_norm()),
            "loss_scale": loss_scale(engine),
            "tokens_per_s": tokens_per_step / step_seconds,
            "step_seconds": step_seconds,
            "data_wait_seconds": _data_wait(loader) - waited_before,
            "moe": model.moe_metrics(),
        }
        tokens_seen += tokens_per_step
        if checkpoints and checkpoints.should_save(step):  # interval, last step, or a stop request
            save_started = time.perf_counter()
            checkpoints.save(step, tokens_seen)
            record["checkpoint_save_seconds"] = time.perf_counter() - save_started
        history.append(record)
        log.step(record)
        if checkpoints and checkpoints.stopping and step < cfg.train.steps:
            raise StopRequested(step, history)
    losses = f"loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}" if history else "nothing left to train"
    log.close(f"parallax: done: {cfg.train.steps} steps, {losses}, run dir {run_dir}")
    return history


def _seed_everything(seed: int) -> None:
    # The same seed on every rank: TP peers must draw the same full weights (each keeps its slice),
    # and DP replicas must start identical.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _data_wait(loader) -> float:
    """Seconds this rank has so far spent blocked on its data loader (0 for a plain batch source)."""
    return getattr(loader, "data_wait_seconds", 0.0)


def _as_float(value) -> Optional[float]:
    return None if value is None else float(value)
