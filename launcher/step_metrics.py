"""Each step's figures, kept on the device until a logging step reads them all at once.

Reading a device tensor on the host (`.item()`, `.tolist()`, `float()`) waits for the device to
finish everything queued before it, so reading the loss every step would stall the GPU's queue
once per step. Instead each step leaves its loss (and DeepSpeed's gradient norm) where they are,
and a logging step synchronises once, reduces every pending loss over DP in one all-reduce and
brings them to the host in one transfer. The clock is read after that synchronisation, so
tokens/s and MFU include the device's trailing work. Nothing is kept past the read.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from parallel.topology import Topology


class StepMetrics:
    def __init__(self, topo: Topology, micro_batches_per_step: int, data_wait: float):
        self.topo = topo
        self.loss_divisor = micro_batches_per_step * topo.dp  # the loss sums of every micro-batch of every DP rank
        self.pending: list[dict] = []
        self.skipped_steps = 0  # steps skipped for a non-finite loss or gradient norm, this launch
        self.restart_clock(data_wait)

    def restart_clock(self, data_wait: float) -> None:
        """Start timing the next interval here: the loop calls it once it has logged, evaluated and saved."""
        self.started, self.data_wait_at_start = time.perf_counter(), data_wait

    def add(self, step: int, loss_sum: torch.Tensor, lr: float, grad_norm, loss_scale, tokens: int,
            segments: Optional[int] = None, skipped: Optional[str] = None) -> None:
        """One step's figures as the engine left them: `loss_sum` and `grad_norm` may be device tensors.
        `tokens`: what the step trained on, all ranks together; `segments`: a memory model's segments per sample,
        which its curriculum may change from step to step; `skipped`: why the step made no update ("non-finite"
        loss or gradient norm, or its batch "dropped"), None when it made one."""
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = grad_norm.detach().clone()  # the engine may reuse its tensor next step
        self.skipped_steps += skipped == "non-finite"
        self.pending.append({"step": step, "loss_sum": loss_sum, "lr": lr, "grad_norm": grad_norm,
                             "loss_scale": loss_scale, "tokens": tokens, "segments": segments, "skipped": skipped,
                             "skipped_steps": self.skipped_steps})

    def read(self, data_wait: float, moe: list[dict]) -> list[dict]:
        """Every pending step's record; the last one also carries the interval's throughput, the
        time it waited for data, and `moe` (the MoE layers' figures of its last forward pass)."""
        if self.topo.device.type == "cuda":
            torch.cuda.synchronize(self.topo.device)
        seconds = time.perf_counter() - self.started
        losses = torch.stack([p["loss_sum"] for p in self.pending])
        # Every DP rank's last pipeline stage holds its own shard's loss; the run's loss is their mean.
        self.topo.sum_scored(losses)
        losses = (losses / self.loss_divisor).tolist()
        records = [{"step": p["step"], "loss": None if p["skipped"] == "dropped" else loss, "lr": p["lr"],
                    "grad_norm": _as_float(p["grad_norm"]),
                    "loss_scale": _as_float(p["loss_scale"]), "skipped_steps": p["skipped_steps"],
                    **({"segments": p["segments"]} if p["segments"] is not None else {}),
                    **({"skipped": p["skipped"]} if p["skipped"] else {})}
                   for p, loss in zip(self.pending, losses)]
        steps = len(records)
        records[-1].update({
            "tokens_per_s": sum(p["tokens"] for p in self.pending) / seconds,
            "step_seconds": seconds / steps,
            "data_wait_seconds": (data_wait - self.data_wait_at_start) / steps,
            "moe": moe,
        })
        self.pending = []
        return records


def _as_float(value) -> Optional[float]:
    return None if value is None else float(value)
