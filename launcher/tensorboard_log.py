"""TensorBoard events for a run, written from the step record the training loop already builds.

Global rank 0 writes `<run_dir>/tensorboard/`; with `logging.tensorboard=every_rank` every other
rank also writes its own figures (time, throughput, memory as that rank saw them) to
`<run_dir>/tensorboard/rank-NNNNN/`. At start the resolved config and the parallel layout are
written as text. Tags: train/* and the checkpoint time at every optimizer step; at logging steps,
time and throughput averaged over the steps since the previous one, memory and MoE as of that step:

    train/loss  train/lr  train/grad_norm  train/loss_scale (fp16 only)
    throughput/tokens_per_s  throughput/tokens_per_s_per_device  throughput/samples_per_s
    throughput/tflops_per_device  throughput/mfu  throughput/peak_tflops_per_device
    time/step_seconds  time/data_wait_fraction  time/checkpoint_save_seconds (steps that saved)
    memory/cuda_max_allocated_gib (GPU) or memory/rss_gib (CPU)
    moe/layer_L/expert_E_load  moe/layer_L/dropped_fraction  moe/layer_L/aux_loss  moe/layer_L/z_loss
    eval/loss  eval/ppl (at each evaluation, on the training step axis; step 0 is before the first step)

Model FLOPs per step are Megatron's count (launcher/plan/throughput.py, README): every matrix
multiply of the forward pass, attention scores included, times 3 for forward and backward;
recomputation is not counted. MFU divides the per-device rate by a peak per device: the
`logging.peak_tflops` setting, else the plan's table for the GPU (A100/H100/H200 at the run's
precision), else on CPU a peak measured at start by a short matmul probe in the run's dtype on
this rank's threads.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import torch

from launcher.config import RunConfig
from launcher.plan.hardware import GPUS, GiB, TERA
from launcher.plan.throughput import forward_flops_per_sequence
from parallel.engine import PARAMS_DTYPE
from parallel.topology import Topology


class TensorBoardLog:
    def __init__(self, events_dir: Path, cfg: RunConfig, topo: Topology, vocab_size: int, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.topo = topo
        self.sequences_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * topo.dp
        blocks, output = forward_flops_per_sequence(cfg, vocab_size)
        self.flops_per_step = 3 * self.sequences_per_step * (blocks + output)
        self.peak_flops, peak_source = peak_flops_per_device(cfg, topo.device)
        # purge_step: a resumed run redoes the steps after its checkpoint; TensorBoard drops the
        # earlier launch's events from that step on instead of drawing both.
        self.writer = SummaryWriter(str(events_dir), purge_step=first_step if first_step > 1 else None)
        self.writer.add_text("config", _as_code(cfg.to_yaml()), first_step)
        layout = (f"{topo.describe()} zero={cfg.parallel.zero_stage} precision={cfg.train.precision}; "
                  f"{self.sequences_per_step} sequences x {cfg.data.seq_len} tokens per step; "
                  f"model FLOPs per step {self.flops_per_step:.4g}; "
                  f"peak per device {f'{self.peak_flops / TERA:.4g}' if self.peak_flops else 'unknown'} TFLOP/s ({peak_source})")
        self.writer.add_text("layout", _as_code(layout), first_step)
        self.first_step = first_step

    @classmethod
    def open(cls, cfg: RunConfig, topo: Topology, vocab_size: int, first_step: int) -> Optional[TensorBoardLog]:
        """This rank's writer, or None when it writes no events (every rank but 0, unless every_rank)."""
        who = cfg.logging.tensorboard
        if who == "off" or (who == "rank0" and topo.rank != 0):
            return None
        events_dir = Path(cfg.logging.run_dir) / "tensorboard"
        if topo.rank != 0:
            events_dir = events_dir / f"rank-{topo.rank:05d}"
        return cls(events_dir, cfg, topo, vocab_size, first_step)

    def write(self, records: list[dict]) -> None:
        """Every step's training figures; the timing, throughput, memory and MoE figures of the
        records that carry them (the logging steps')."""
        for record in records:
            step = record["step"]
            scalars = {
                "train/loss": record["loss"],
                "train/lr": record["lr"],
                "train/grad_norm": record["grad_norm"],
                "train/loss_scale": record.get("loss_scale"),
                "train/skipped_steps": record.get("skipped_steps"),
                "stragglers/rank_cpu_seconds_median": record.get("rank_cpu_seconds_median"),
                "stragglers/rank_cpu_seconds_max": record.get("rank_cpu_seconds_max"),
                "stragglers/slowest_rank": record.get("slowest_rank"),
                "time/checkpoint_save_seconds": record.get("checkpoint_save_seconds"),
            }
            if "step_seconds" in record:
                scalars.update(self._interval_scalars(record))
            if step == self.first_step and self.peak_flops:
                scalars["throughput/peak_tflops_per_device"] = self.peak_flops / TERA
            for tag, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a run that stops on a signal exits without close(); keep the file current

    def evaluation(self, record: dict) -> None:
        self.writer.add_scalar("eval/loss", record["eval_loss"], record["step"])
        self.writer.add_scalar("eval/ppl", record["eval_ppl"], record["step"])
        if "eval_accuracy" in record:
            self.writer.add_scalar("eval/accuracy", record["eval_accuracy"], record["step"])
        self.writer.flush()

    def _interval_scalars(self, record: dict) -> dict:
        seconds = record["step_seconds"]
        tflops_per_device = self.flops_per_step / seconds / self.topo.world_size / TERA
        return {
            "throughput/tokens_per_s": record["tokens_per_s"],
            "throughput/tokens_per_s_per_device": record["tokens_per_s"] / self.topo.world_size,
            "throughput/samples_per_s": self.sequences_per_step / seconds,
            "throughput/tflops_per_device": tflops_per_device,
            "throughput/mfu": tflops_per_device * TERA / self.peak_flops if self.peak_flops else None,
            "time/step_seconds": seconds,
            "time/data_wait_fraction": record["data_wait_seconds"] / seconds,
            **_memory(self.topo.device),
            **_moe(record["moe"]),
        }

    def close(self) -> None:
        self.writer.close()


def peak_flops_per_device(cfg: RunConfig, device: torch.device) -> tuple[Optional[float], str]:
    """(FLOP/s, where the figure comes from) that MFU is measured against; None for a GPU not in the table."""
    precision = cfg.train.precision
    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops * TERA, "logging.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, gpu in GPUS.items():
            if key.split("-")[0].upper() in name.upper() and precision in gpu.peak_tflops:
                return gpu.peak_tflops[precision] * TERA, f"{gpu.name} {precision} dense peak"
        return None, f"no peak known for {name} at {precision}, so no MFU; set logging.peak_tflops"
    return measure_cpu_flops(PARAMS_DTYPE[precision]), f"CPU matmul probe, {precision}, {torch.get_num_threads()} thread(s)"


def measure_cpu_flops(dtype: torch.dtype, n: int = 512, seconds: float = 0.25) -> float:
    """FLOP/s of back-to-back n x n matmuls on this process's threads: the CPU's practical peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # first call: thread pool and kernel selection
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / elapsed


def _memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"memory/cuda_max_allocated_gib": torch.cuda.max_memory_allocated(device) / GiB}
    import psutil

    return {"memory/rss_gib": psutil.Process(os.getpid()).memory_info().rss / GiB}


def _moe(layers: list[dict]) -> dict[str, float]:
    """Per MoE layer: each expert's share of the routed (token, expert) pairs, dropped fraction, router losses."""
    scalars = {}
    for layer in layers:
        prefix, routed = f"moe/layer_{layer['layer']}", sum(layer["tokens_per_expert"])
        for expert, tokens in enumerate(layer["tokens_per_expert"]):
            scalars[f"{prefix}/expert_{expert}_load"] = tokens / routed if routed else 0.0
        for name in ("dropped_fraction", "aux_loss", "z_loss"):
            scalars[f"{prefix}/{name}"] = layer[name]
    return scalars


def _as_code(text: str) -> str:
    """TensorBoard renders text as Markdown; indenting by four spaces keeps YAML as it is."""
    return "\n".join(f"    {line}" for line in text.splitlines())
