"""The one-GPU smoke check (issue 14 point 8): one command, one table, exit status 1 if a check fails.

    bench/gpu/smoke.sh                 on a one-GPU machine: installs the carried wheels, runs this
    bench/gpu/smoke.py --cpu           anywhere: the same wiring on CPU, GPU-only checks skipped

Most checks are real `parallax train` launches (python -m launcher.cli train) of the tiny configs, 12
steps each, several at a time, read back from RUN_DIR/metrics.jsonl (loss per step) and the
TensorBoard events (MFU, peak, memory); the rest run in this process once the launches are done:
- gpt-tiny bf16 at ZeRO 0-3, saving every 6 steps; fp16 (dynamic loss scale) at ZeRO 0 and 1; t5-tiny
  bf16 at ZeRO 1 and 3; gpt-moe-tiny bf16 (EP=1): every loss finite, the last steps below the first;
- fp32 on the GPU and on the CPU from the same seed: the step-1 losses agree within 1e-4;
- a run stopped at step 6 (exit 75) and launched again matches the uninterrupted run; the GPU run's
  step-6 checkpoint resumed on the CPU (CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu) scores step 7 alike;
- TensorBoard: the peak is the plan's figure for this GPU, 0 < MFU < 1, the device's memory tag;
- SDPA, as the profiler records it: the GPT's attention runs a flash kernel (torch's or cuDNN's)
  forward and backward, T5's biased attention the memory-efficient kernel, whose relative-bias
  gradient matches the math kernel's (fp32, where the comparison is tight);
- throughput of a GPT-2 XL-sized model (1.5B, sequence 1024, bf16, no activation checkpointing):
  Parallax's engine at ZeRO-1 against the same math in plain PyTorch (fp32 weights, bf16 autocast,
  fused torch AdamW; it first scores Parallax's own weights to the same loss) and transformers'
  GPT2LMHeadModel with SDPA, one system after another on one batch. Targets: MFU >= 45%, and at
  least plain PyTorch's tokens/s.
With --cpu the throughput runs at gpt-tiny's size and the GPU-only rows say "skipped (no GPU)".
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # this checkout's Parallax, and bench/overhead.py

STEPS, SAVE_EVERY, STOP_AT = 12, 6, 6
LAUNCH_TIMEOUT = 600  # seconds; a launch takes ~15 s on a GPU, up to a minute on 2 CPU cores
FP32_DEVICES_TOLERANCE = 1e-4
# GPU kernels are not bitwise deterministic (flash attention's backward accumulates with atomics), so
# two runs of the same steps differ slightly; a resume that lost its place differs by ~0.1 and more.
RESUME_TOLERANCE = 2e-2
BIAS_GRAD_TOLERANCE = 1e-2  # relative to the largest entry; a broken gradient is off by O(1)
SAME_MATH_TOLERANCE = 1e-4  # fp32, 48 layers
MFU_TARGET, PLAIN_TORCH_TARGET = 0.45, 1.0
NO_GPU = "skipped (no GPU)"


@dataclass
class Run:
    """One `parallax train` run directory: one launch, or two when it stops at STOP_AT and is launched again."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    role: str = "train"  # train: its curve is checked; devices, resume: compared with another run
    on_cpu: bool = False
    stop_and_relaunch: bool = False
    resume: Optional[Path] = None
    exit_codes: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def command(self, out: Path, kit: Path) -> list[str]:
        data = json.dumps([{"path": str(kit / "cache" / "corpus"), "format": "jsonl"}])
        stop = [f"train.stop_at_step={STOP_AT}"] if self.stop_and_relaunch else []
        resume = ["--resume", str(self.resume)] if self.resume else []
        return [sys.executable, "-m", "launcher.cli", "train", f"configs/{self.config}.yaml", *resume,
                f"train.steps={STEPS}", "logging.interval=2", f"checkpoint.interval={SAVE_EVERY}",
                "optim.warmup_steps=2", f"data.sources={data}", f"data.tokenizer={kit / 'cache' / 'tokenizer.json'}",
                f"logging.run_dir={out / self.name}", *stop, *self.overrides]

    def launch(self, out: Path, kit: Path, env: dict[str, str]) -> None:
        if self.on_cpu:
            env = {**env, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
        started = time.perf_counter()
        for attempt in range(2 if self.stop_and_relaunch else 1):  # the same command again: "requeue me"
            with open(out / f"{self.name}.launch-{attempt + 1}.log", "w") as log:
                # A session of its own, so that a launch past its time goes with every rank it started.
                proc = subprocess.Popen(self.command(out, kit), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                try:
                    self.exit_codes.append(proc.wait(timeout=LAUNCH_TIMEOUT))
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    self.exit_codes.append(124)
        self.seconds = time.perf_counter() - started
        print(f"smoke: {self.name}: exit {' then '.join(map(str, self.exit_codes))} in {self.seconds:.0f}s",
              file=sys.stderr, flush=True)

    def records(self, out: Path) -> list[dict]:
        """metrics.jsonl's step records, one per optimizer step, in the order logged (not its evaluations')."""
        path = out / self.name / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [record for record in map(json.loads, filter(str.strip, lines)) if "loss" in record]

    def losses(self, out: Path) -> dict[int, float]:
        """step -> loss; a step logged twice (redone after a resume) keeps its last record."""
        return {r["step"]: r["loss"] for r in self.records(out)}

    def saved_steps(self, out: Path) -> list[int]:
        root = out / self.name / "checkpoints"
        return sorted(int(p.name[5:]) for p in root.glob("step-*") if (p / "manifest.json").exists())


@dataclass
class Row:
    check: str
    figure: str
    target: str
    verdict: str  # PASS, FAIL, skipped (no GPU), info


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def gpu_only(ok: bool, gpu: bool) -> str:
    """A GPU claim: on CPU, where its CPU counterpart holds, it is skipped, not passed; where even that fails, FAIL."""
    return verdict(ok) if gpu or not ok else NO_GPU


# --- the launches -------------------------------------------------------------------------------


def plan_runs(out: Path, gpu: bool) -> dict[str, Run]:
    bf16 = ("train.precision=bf16",)
    runs = [Run(f"gpt-bf16-zero{z}", "gpt-tiny", (*bf16, f"parallel.zero_stage={z}")) for z in range(4)]
    if gpu:  # DeepSpeed's loss scaler is CUDA-only; Parallax refuses fp16 on CPU
        runs += [Run(f"gpt-fp16-zero{z}", "gpt-tiny", ("train.precision=fp16", f"parallel.zero_stage={z}"))
                 for z in (0, 1)]
    runs += [Run(f"t5-bf16-zero{z}", "t5-tiny", (*bf16, f"parallel.zero_stage={z}")) for z in (1, 3)]
    runs += [
        Run("moe-bf16-zero1", "gpt-moe-tiny", (*bf16, "parallel.ep=1")),
        Run("gpt-fp32-gpu", "gpt-tiny", ("train.precision=fp32", "train.steps=1"), role="devices"),
        Run("gpt-fp32-cpu", "gpt-tiny", ("train.precision=fp32", "train.steps=1"), role="devices", on_cpu=True),
        Run("gpt-bf16-zero1-stopped", "gpt-tiny", (*bf16, "parallel.zero_stage=1"), role="resume",
            stop_and_relaunch=True),
        Run("gpt-bf16-zero1-on-cpu", "gpt-tiny", (*bf16, "parallel.zero_stage=1"), role="resume", on_cpu=True,
            resume=out / "gpt-bf16-zero1" / "checkpoints" / f"step-{SAVE_EVERY:08d}"),
    ]
    return {run.name: run for run in runs}


def launch_all(runs: dict[str, Run], out: Path, kit: Path, jobs: int) -> None:
    """Every run, `jobs` at a time; the CPU resume waits for the checkpoint it resumes from."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    chains = [[runs["gpt-bf16-zero1"], runs["gpt-bf16-zero1-on-cpu"]]]
    chains += [[run] for name, run in runs.items() if name not in ("gpt-bf16-zero1", "gpt-bf16-zero1-on-cpu")]
    for run in runs.values():
        shutil.rmtree(out / run.name, ignore_errors=True)

    def run_chain(chain: list[Run]) -> None:
        for run in chain:
            run.launch(out, kit, env)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(run_chain, chains))


# --- checks on the launches ----------------------------------------------------------------------


def curve(losses: dict[int, float]) -> tuple[bool, str]:
    """Finite at every step, and the mean of the last 3 steps below the mean of the first 3."""
    values = [losses[s] for s in sorted(losses)]
    if len(values) != STEPS:
        return False, f"{len(values)} of {STEPS} steps logged"
    finite = all(math.isfinite(v) for v in values)
    falling = finite and statistics.mean(values[-3:]) < statistics.mean(values[:3])
    return finite and falling, f"loss {values[0]:.3f} -> {values[-1]:.3f}"


def training_rows(runs: dict[str, Run], out: Path, gpu: bool) -> list[Row]:
    """Each training run's curve; the gpt-tiny bf16 runs' checkpoints; the fp16 runs' loss scale."""
    rows = []
    for run in (run for run in runs.values() if run.role == "train"):
        ok, figure = curve(run.losses(out))
        target = "finite, falling"
        if run.name.startswith("gpt-bf16-zero"):
            saved = run.saved_steps(out)
            ok, figure, target = ok and saved == [SAVE_EVERY, STEPS], f"{figure}; saved {saved}", f"{target}; saved [6, 12]"
        if run.name.startswith("gpt-fp16"):
            scales = [r.get("loss_scale") for r in run.records(out)]
            logged = bool(scales) and all(s is not None and s > 0 for s in scales)
            ok = ok and logged and "train/loss_scale" in _scalar_tags(out / run.name / "tensorboard")
            figure += f"; scale {scales[0]:g} -> {scales[-1]:g}" if logged else "; loss scale missing"
            target += "; scale in metrics and TensorBoard"
        rows.append(Row(f"{run.name} ({_device(run, gpu)})", _with_exit(run, figure), target,
                        verdict(ok and _exited(run))))
    return rows


def _device(run: Run, gpu: bool) -> str:
    return "GPU" if gpu and not run.on_cpu else "CPU"


def _exited(run: Run, expected: tuple[int, ...] = (0,)) -> bool:
    return tuple(run.exit_codes) == expected


def _with_exit(run: Run, figure: str) -> str:
    return figure if set(run.exit_codes) <= {0, 75} else f"exit {run.exit_codes}, see {run.name}.launch-*.log; {figure}"


def devices_row(runs: dict[str, Run], out: Path, gpu: bool) -> Row:
    gpu_run, cpu_run = runs["gpt-fp32-gpu"], runs["gpt-fp32-cpu"]
    on_gpu, on_cpu = gpu_run.losses(out).get(1), cpu_run.losses(out).get(1)
    if on_gpu is None or on_cpu is None:
        figure = f"step 1 not logged (exit {gpu_run.exit_codes} and {cpu_run.exit_codes}, see gpt-fp32-*.log)"
        return Row("fp32 step-1 loss, GPU vs CPU", figure, f"|diff| <= {FP32_DEVICES_TOLERANCE:g}", "FAIL")
    diff = abs(on_gpu - on_cpu)
    return Row("fp32 step-1 loss, GPU vs CPU", f"{on_gpu:.6f} vs {on_cpu:.6f}, |diff| {diff:.1e}",
               f"|diff| <= {FP32_DEVICES_TOLERANCE:g}", gpu_only(diff <= FP32_DEVICES_TOLERANCE, gpu))


def resume_rows(runs: dict[str, Run], out: Path, gpu: bool) -> list[Row]:
    whole = runs["gpt-bf16-zero1"].losses(out)
    stopped, on_cpu = runs["gpt-bf16-zero1-stopped"], runs["gpt-bf16-zero1-on-cpu"]
    redone = stopped.losses(out)
    later = range(STOP_AT + 1, STEPS + 1)
    if all(s in redone and s in whole for s in later):
        gap = max(abs(redone[s] - whole[s]) for s in later)
        ok = _exited(stopped, (75, 0)) and sorted(redone) == list(range(1, STEPS + 1)) and gap <= RESUME_TOLERANCE
        figure = f"exit {stopped.exit_codes}; steps 7-12 max |diff| {gap:.1e} vs uninterrupted"
    else:
        ok, figure = False, _with_exit(stopped, f"steps logged {sorted(redone)}")
    rows = [Row(f"stop at 6, launch again ({_device(stopped, gpu)})", figure, f"exit 75 then 0; <= {RESUME_TOLERANCE:g}",
                verdict(ok))]

    moved = on_cpu.losses(out)
    if STOP_AT + 1 in moved and STOP_AT + 1 in whole:
        gap = abs(moved[STOP_AT + 1] - whole[STOP_AT + 1])
        finite = all(math.isfinite(v) for v in moved.values())
        ok = _exited(on_cpu) and sorted(moved) == list(later) and finite and gap <= RESUME_TOLERANCE
        figure = f"steps {min(moved)}-{max(moved)} on CPU, {'finite' if finite else 'NOT FINITE'}; step-7 |diff| {gap:.1e}"
    else:
        ok, figure = False, _with_exit(on_cpu, f"steps logged {sorted(moved)}")
    rows.append(Row("GPU step-6 checkpoint resumed on CPU", figure, f"steps 7-12, finite; <= {RESUME_TOLERANCE:g}",
                    gpu_only(ok, gpu)))
    return rows


def _scalar_tags(events: Path) -> set[str]:
    return set(_accumulator(events).Tags()["scalars"]) if events.is_dir() else set()


def _accumulator(events: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def tensorboard_row(runs: dict[str, Run], out: Path, gpu: bool) -> Row:
    """The GPU run's own figures: its peak is the plan's for this GPU, 0 < MFU < 1, CUDA memory. On CPU
    the peak is a matmul probe at start, which other load on the machine can leave below what the steps
    then reach (MFU over 1), so there the row asks only that the figures are there."""
    import torch

    from launcher.config import load_config
    from launcher.plan.hardware import TERA
    from launcher.tensorboard_log import peak_flops_per_device

    events = out / "gpt-bf16-zero1" / "tensorboard"
    if not events.is_dir():
        return Row("TensorBoard: peak, MFU, memory", "no events", "", "FAIL")
    tb = _accumulator(events)
    memory_tag = "memory/cuda_max_allocated_gib" if gpu else "memory/rss_gib"
    peak, mfu, memory = ([e.value for e in tb.Scalars(tag)] if tag in tb.Tags()["scalars"] else []
                         for tag in ("throughput/peak_tflops_per_device", "throughput/mfu", memory_tag))
    if gpu:
        expected, _ = peak_flops_per_device(load_config(REPO / "configs/gpt-tiny.yaml", ["train.precision=bf16"]),
                                            torch.device("cuda"))
        peak_ok = bool(peak) and expected is not None and abs(peak[0] - expected / TERA) < 1e-6
        peak_target = f"{expected / TERA:g} ({torch.cuda.get_device_name()})" if expected else "a known GPU"
    else:
        peak_ok, peak_target = bool(peak) and peak[0] > 0, "> 0 (CPU probe)"
    mfu_ok = bool(mfu) and all(0 < m < (1 if gpu else math.inf) for m in mfu)
    memory_ok = bool(memory) and all(m > 0 for m in memory)
    figure = (f"peak {peak[0] if peak else math.nan:.4g} TFLOP/s; MFU {min(mfu, default=0):.2g}-{max(mfu, default=0):.2g} "
              f"({len(mfu)} steps); {memory_tag} {max(memory, default=0):.2f}")
    return Row("TensorBoard: peak, MFU, memory", figure, f"peak {peak_target}; 0 < MFU < 1; {memory_tag}",
               gpu_only(peak_ok and mfu_ok and memory_ok, gpu))


# --- in this process: SDPA kernels and throughput --------------------------------------------------


def sdpa_kernels(model, inputs: dict) -> set[str]:
    """The SDPA kernels (aten ops) one forward and backward of `model` runs, as the profiler records them."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**inputs).backward()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    prefix = "aten::_scaled_dot_product_"
    return {e.name[len(prefix):] for e in prof.events() if e.name.startswith(prefix)}


def sdpa_rows(device, gpu: bool) -> list[Row]:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from launcher.config import load_config
    from models import build_model

    def model_and_batch(config: str, dtype):
        cfg = load_config(REPO / "configs" / f"{config}.yaml", ["train.micro_batch_size=4"])
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, cfg.data.vocab_size).to(device, dtype)
        def ids(length: int):
            return torch.randint(0, cfg.data.vocab_size, (cfg.train.micro_batch_size, length), device=device)

        if cfg.model.arch == "t5":
            s_in, s_out = cfg.t5_lengths()
            return model, {"input_ids": ids(s_in), "decoder_input_ids": ids(s_out), "labels": ids(s_out)}
        tokens = ids(cfg.data.seq_len + 1)
        return model, {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    gpt, batch = model_and_batch("gpt-tiny", torch.bfloat16)
    seen = sdpa_kernels(gpt, batch)
    # torch 2.11 on an H200 prefers cuDNN's flash-attention kernel to its own: either is the fused kernel
    flash = ([{"flash_attention", "flash_attention_backward"}, {"cudnn_attention", "cudnn_attention_backward"}] if gpu
             else [{"flash_attention_for_cpu", "flash_attention_for_cpu_backward"}])
    rows = [Row("SDPA: GPT attention (bf16)", ", ".join(sorted(seen)), "flash (torch's or cuDNN's) forward and "
                "backward only", gpu_only(seen in flash, gpu))]

    t5, batch = model_and_batch("t5-tiny", torch.bfloat16)
    seen = sdpa_kernels(t5, batch)
    efficient = {"efficient_attention", "efficient_attention_backward"}
    ok = efficient <= seen and not any("math" in k for k in seen)  # unbiased cross-attention may take flash
    rows.append(Row("SDPA: T5 attention with bias (bf16)", ", ".join(sorted(seen)),
                    "efficient_attention forward and backward; no math", verdict(ok) if gpu else NO_GPU))

    t5, batch = model_and_batch("t5-tiny", torch.float32)
    fast = [SDPBackend.EFFICIENT_ATTENTION] if gpu else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]

    def bias_gradient(backends) -> torch.Tensor:
        t5.zero_grad(set_to_none=True)
        with sdpa_kernel(backends):
            t5(**batch).backward()
        return torch.cat([t5.encoder.relative_bias.weight.grad.flatten(), t5.decoder.relative_bias.weight.grad.flatten()])

    ours, math_kernel = bias_gradient(fast), bias_gradient([SDPBackend.MATH])
    error = ((ours - math_kernel).abs().max() / math_kernel.abs().max()).item()
    rows.append(Row("SDPA: T5 bias gradient, efficient vs math (fp32)", f"max |diff| / max |grad| {error:.1e}",
                    f"<= {BIAS_GRAD_TOLERANCE:g}", gpu_only(error <= BIAS_GRAD_TOLERANCE, gpu)))
    return rows


def throughput_rows(device, topo, gpu: bool, micro_batch: int, steps: int) -> list[Row]:
    import torch

    from launcher.config import load_config
    from launcher.plan.throughput import forward_flops_per_sequence
    from launcher.tensorboard_log import peak_flops_per_device
    from models.gpt import GPT
    from overhead import (adamw_like_parallax, bare_copy, engine_step, gpt2_like, plain_step, same_weights_losses,
                          transformers_loss)
    from parallel.engine import build_engine

    warmup = 3
    config, vocab = ("gpt2-xl", 50257) if gpu else ("gpt-tiny", 8192)
    cfg = load_config(REPO / "configs" / f"{config}.yaml", [
        f"model.vocab_size={vocab}", "parallel.zero_stage=1", "parallel.activation_checkpointing=false",
        "train.precision=bf16", "train.grad_accum=1", f"train.micro_batch_size={micro_batch}",
        f"train.steps={warmup + steps}",
    ])
    flops_per_step = 3 * micro_batch * sum(forward_flops_per_sequence(cfg, vocab))
    peak, _ = peak_flops_per_device(cfg, device)
    torch.manual_seed(cfg.train.seed)
    tokens = torch.randint(0, vocab, (micro_batch, cfg.data.seq_len + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    synchronize = torch.cuda.synchronize if gpu else (lambda: None)

    def tokens_per_second(step: Callable) -> float:
        for _ in range(warmup):
            step(x, y)
        synchronize()
        seconds = []
        for _ in range(steps):
            started = time.perf_counter()
            step(x, y)
            synchronize()
            seconds.append(time.perf_counter() - started)
        return x.numel() / statistics.median(seconds)

    def in_bf16(loss_fn):
        def loss(model, x, y):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return loss_fn(model, x, y)
        return loss

    def plain(model, loss_fn):
        opt, schedule = adamw_like_parallax(model, cfg)
        return plain_step(model, opt, schedule, in_bf16(loss_fn), cfg.optim.grad_clip)

    def transformers():
        with torch.device(device):
            model = gpt2_like(cfg, vocab)
        return plain(model, transformers_loss)

    def measured(build: Callable) -> float:
        rate = tokens_per_second(build())
        gc.collect()  # the system's model and optimizer go before the next one is built
        torch.cuda.empty_cache() if gpu else None
        return rate

    parallax_model = GPT(cfg.model, vocab).to(device)  # fp32 until the engine takes it
    bare = bare_copy(cfg, parallax_model, vocab)
    ours, theirs = same_weights_losses(parallax_model, bare, x[:1], y[:1])
    rates = {"plain PyTorch": measured(lambda: plain(bare, lambda model, x, y: model(x, y)))}
    del bare
    rates["transformers"] = measured(transformers)
    rates["Parallax"] = measured(lambda: engine_step(build_engine(parallax_model, cfg, topo)))

    def mfu(rate: float) -> float:
        return rate * flops_per_step / x.numel() / peak

    size = f"{config} x{micro_batch}x{cfg.data.seq_len}"
    gap = abs(ours - theirs)
    rows = [
        Row("throughput: plain PyTorch is Parallax's math (fp32)", f"loss {ours:.5f} vs {theirs:.5f}, |diff| {gap:.1e}",
            f"<= {SAME_MATH_TOLERANCE:g}", verdict(gap <= SAME_MATH_TOLERANCE)),
        Row(f"throughput: Parallax ZeRO-1 bf16, {size}", f"{rates['Parallax']:,.0f} tokens/s, MFU {mfu(rates['Parallax']):.1%}",
            f"MFU >= {MFU_TARGET:.0%}", verdict(mfu(rates["Parallax"]) >= MFU_TARGET) if gpu else NO_GPU),
    ]
    for other, target in (("plain PyTorch", PLAIN_TORCH_TARGET), ("transformers", None)):
        ratio = rates["Parallax"] / rates[other]
        result = (verdict(ratio >= target) if target else "info") if gpu else NO_GPU
        rows.append(Row(f"throughput: Parallax / {other}", f"{ratio:.2f}x ({other}: {rates[other]:,.0f} tokens/s, "
                        f"MFU {mfu(rates[other]):.1%})", f">= {target:.1f}x" if target else "reported", result))
    return rows


# --- the table ------------------------------------------------------------------------------------


def in_process_rows(device, gpu: bool, micro_batch: int, timed_steps: int) -> list[Row]:
    """The SDPA and throughput rows, built in this process as a rank builds its model and engine
    (tests/test_gpu_path.py runs them on CPU, so that a GPU's few minutes are not lost to a broken import)."""
    from launcher.console import quiet_third_party
    from overhead import init_one_process

    quiet_third_party()
    topo = init_one_process()  # megatron's groups, which the models are built in, and the engine's
    return [*rows_or_failure("SDPA", lambda: sdpa_rows(device, gpu)),
            *rows_or_failure("throughput", lambda: throughput_rows(device, topo, gpu, micro_batch, timed_steps))]


def rows_or_failure(checks: str, make_rows: Callable[[], list[Row]]) -> list[Row]:
    """Rows checked in this process; one that raised is one FAIL row with its error, and the table still prints."""
    try:
        return make_rows()
    except Exception as e:  # noqa: BLE001  whatever failed is the finding
        return [Row(checks, f"{type(e).__name__}: {str(e).splitlines()[0][:100]}", "runs", "FAIL")]


def print_table(rows: list[Row]) -> None:
    headers = Row("check", "figure", "target", "result")
    widths = [max(len(getattr(r, f)) for r in [headers, *rows]) for f in ("check", "figure", "target", "verdict")]
    for row in [headers, None, *rows]:
        if row is None:
            print("  ".join("-" * w for w in widths))
            continue
        cells = (row.check, row.figure, row.target, row.verdict)
        print("  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip())


def failed_logs(runs: dict[str, Run], out: Path) -> None:
    """The end of each failed launch's output, under the table."""
    for run in runs.values():
        if run.exit_codes and set(run.exit_codes) - {0, 75}:
            for log in sorted(out.glob(f"{run.name}.launch-*.log")):
                print(f"\n--- {log} (last lines)")
                print("\n".join(log.read_text().splitlines()[-15:]))


def preflight(gpu: bool) -> None:
    """Say what this machine is, and what the CPU launches will need before they fail on it."""
    import torch

    device = torch.cuda.get_device_name() if gpu else "CPU only"
    print(f"smoke: {device}; torch {torch.__version__} (CUDA {torch.version.cuda}); python {sys.version.split()[0]}",
          file=sys.stderr)
    # DeepSpeed's CPU accelerator JIT-builds a shared-memory op at start: a C++ compiler, ninja, Python.h.
    missing = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        missing.append("Python.h")
    if missing:
        print(f"smoke: warning: the CPU launches will fail: DeepSpeed's CPU op build lacks {', '.join(missing)}",
              file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on CPU (GPU-only checks are reported as skipped)")
    parser.add_argument("--kit", type=Path, default=REPO / ".gpu" / "carry", help="what `make gpu-wheels` wrote")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-smoke", help="run directories and launch logs")
    parser.add_argument("--jobs", type=int, default=None, help="launches at a time (default: 4 on a GPU, 1 on CPU)")
    parser.add_argument("--micro-batch", type=int, default=None, help="throughput batch (default: 8 on a GPU, 4 on CPU)")
    parser.add_argument("--timed-steps", type=int, default=10, help="throughput steps timed per system, after 3 warm-up")
    args = parser.parse_args()
    if args.cpu:  # before torch is imported, for this process and every launch
        os.environ.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.cpu:
        sys.exit("smoke: no CUDA device here; --cpu runs the same checks on CPU, GPU-only ones reported as skipped")
    for needed in ("corpus", "tokenizer.json"):
        if not (args.kit / "cache" / needed).exists():
            sys.exit(f"smoke: {args.kit / 'cache' / needed} not found; run 'make gpu-wheels' first")
    args.out.mkdir(parents=True, exist_ok=True)
    preflight(gpu)
    started = time.perf_counter()
    runs = plan_runs(args.out, gpu)
    launch_all(runs, args.out, args.kit.resolve(), args.jobs or (4 if gpu else 1))

    rows = training_rows(runs, args.out, gpu)
    if not gpu:
        rows.append(Row("fp16, dynamic loss scale", "not run: fp16 needs CUDA", "finite, falling; scale logged", NO_GPU))
    rows += [devices_row(runs, args.out, gpu), *resume_rows(runs, args.out, gpu), tensorboard_row(runs, args.out, gpu)]
    device = torch.device("cuda" if gpu else "cpu")
    rows += in_process_rows(device, gpu, args.micro_batch or (8 if gpu else 4), args.timed_steps)

    print_table(rows)
    failed_logs(runs, args.out)
    failures = [row.check for row in rows if row.verdict == "FAIL"]
    print(f"\nsmoke: {len(rows) - len(failures)} of {len(rows)} rows passed or skipped, {len(failures)} failed, "
          f"in {time.perf_counter() - started:.0f}s; run directories and logs in {args.out}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
