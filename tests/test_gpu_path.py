"""Issue 14: the parts of the CUDA/NCCL path that a CPU can check without a GPU.

What needs a GPU (NCCL itself, flash attention, CUDA generators, throughput) is checked by the
one-GPU smoke check in bench/gpu/.
"""
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.config import load_config
from launcher.plan.hardware import GPUS
from parallel.engine import deepspeed_config
from parallel.topology import Topology, TopologyError, cuda_device

REPO = Path(__file__).resolve().parents[1]


def test_a_rank_without_its_own_gpu_stops_in_one_line():
    assert str(cuda_device(1, visible_gpus=2)) == "cuda:1"
    with pytest.raises(TopologyError) as error:
        cuda_device(2, visible_gpus=2)
    assert "LOCAL_RANK=2 but this process sees 2 GPU(s)" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("precision,zero_stage,fp32_gradients", [
    ("bf16", 1, True), ("bf16", 2, True), ("bf16", 0, False), ("bf16", 3, False), ("fp32", 1, False),
])
def test_bf16_accumulates_and_reduces_gradients_in_fp32_at_zero_1_and_2(precision, zero_stage, fp32_gradients):
    cfg = load_config(None, [f"train.precision={precision}", f"parallel.zero_stage={zero_stage}"])
    topo = Topology(world_size=1, rank=0, tp=1, ep=1, pp=1, dp=1, tp_rank=0, dp_rank=0, ep_rank=0, pp_rank=0, device=None,
                    control_group=None, save_group=None)
    ds = deepspeed_config(cfg, topo)
    assert (ds.get("data_types") == {"grad_accum_dtype": "fp32"}) == fp32_gradients
    assert (ds.get("communication_data_type") == "fp32") == fp32_gradients


def test_deepspeed_builds_fp32_gradients_for_bf16(scenario_results):
    import torch

    built = scenario_results("engines_built")
    assert built["bf16", 1]["optimizer"] == "BF16_Optimizer"  # DeepSpeed's fp32-gradient path at ZeRO-1
    for stage in (1, 2):
        assert (built["bf16", stage]["accumulate"], built["bf16", stage]["reduce"]) == (torch.float32,) * 2, built


def test_every_engine_steps_with_torchs_fused_adamw(scenario_results):
    """DeepSpeed's default, torch's foreach AdamW, took 13% of a GPT-2 XL step on an H200 where a plain PyTorch
    loop runs the fused kernel; fused, the step reads and writes masters and moments once."""
    built = scenario_results("engines_built")
    assert {layout: (b["adamw"], b["fused"]) for layout, b in built.items()} == {
        layout: ("AdamW", True) for layout in built}, built


def test_the_fp32_peak_is_ieee_fp32_not_tf32():
    """Parallax leaves TF32 off, so MFU in fp32 is against the CUDA cores' fp32 peak."""
    assert GPUS["h100"].peak_tflops["fp32"] == 67.0
    assert GPUS["a100"].peak_tflops["fp32"] == 19.5


def test_deepspeed_token_gather_is_replaced_on_gloo_only():
    from deepspeed.moe import mappings

    from models import moe

    moe.use_token_gather_for("nccl")
    assert mappings._gather_tokens is moe._DEEPSPEED_GATHER_TOKENS
    moe.use_token_gather_for("gloo")
    assert mappings._gather_tokens is moe._gather_tokens_for_gloo


def test_the_smoke_checks_in_process_rows_run_on_cpu():
    """bench/gpu/smoke.py waits for a lent GPU, a few minutes a session; on the first one it died at an
    import that had moved. Its SDPA and throughput rows run here at gpt-tiny's size, GPU-only ones skipped."""
    probe = """
import os, sys
os.environ.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
sys.path.insert(0, "bench/gpu")
import torch
import smoke
rows = smoke.in_process_rows(torch.device("cpu"), gpu=False, micro_batch=2, timed_steps=1)
print("\\n".join(f"{row.check} | {row.verdict} | {row.figure}" for row in rows))
"""
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if " | " in line]
    verdicts = [verdict for _, verdict, _ in rows]
    assert len(rows) == 7 and set(verdicts) <= {"PASS", "skipped (no GPU)", "info"}, proc.stdout
