"""Issue 14 point 9: a console a user can read.

The CLI's help is instant and says what Parallax is; a run and a plan print Parallax's own lines and
no third-party warnings; an error several ranks meet is printed once, and a rank that fails only
because its peer did prints nothing. The runs are real: 2 ranks started by `parallax train`.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARALLAX = [sys.executable, "-c", "from launcher.cli import main; main()"]
COMMANDS = ("train", "checkpoint", "prepare-data", "prepare-tokenizer", "tokenize", "plan", "submit", "status")
HEAVY_MODULES = ("torch", "deepspeed", "megatron", "datasets", "pydantic", "launcher.config")
TINY = ["configs/gpt-tiny.yaml", "--nproc", "2", "model.num_layers=2"]


def parallax(*args: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}  # as a user's shell has it
    env.update(env_vars)
    return subprocess.run([*PARALLAX, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def console_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return (proc.stdout + proc.stderr).splitlines()


def test_help_is_instant_and_says_what_parallax_is():
    started = time.perf_counter()
    proc = subprocess.run([*PARALLAX, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    assert seconds < 1.5, f"parallax --help took {seconds:.2f} s"
    assert ("distributed GPT and T5 pretraining with Megatron tensor parallelism under DeepSpeed ZeRO"
            in " ".join(proc.stdout.split())), proc.stdout


def test_no_help_imports_torch_or_the_config():
    """Every command's --help is built from light modules; the command imports its machinery when it runs."""
    probe = f"""
import sys
from launcher.cli import main
for command in ([], *([c] for c in {COMMANDS!r}), ["checkpoint", "consolidate"]):
    try:
        main([*command, "--help"])
    except SystemExit:
        pass
print(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY_MODULES!r} or m in {HEAVY_MODULES!r}), file=sys.stderr)
"""
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr.strip() == "[]", proc.stderr[-3000:]


def test_reading_a_config_imports_no_data_or_model_machinery():
    """`parallax plan` and every rank read the config first; it used to import datasets, pyarrow and pandas
    (0.8 s, 90 MB of each rank's RSS before its model) for one constant of the tokenizer."""
    probe = """
import sys
from launcher.config import load_config
for config in ("configs/gpt-tiny.yaml", "configs/t5-tiny.yaml", "configs/tnlg-17b.yaml"):
    load_config(config, [])
print(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "deepspeed", "megatron", "datasets", "tokenizers"}),
      file=sys.stderr)
"""
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr.strip() == "[]", proc.stderr[-3000:]


def test_a_zero3_run_prints_only_its_own_lines_each_once_and_compiles_nothing(tmp_path):
    """torch's deprecation of the collectives ZeRO-3 calls every step, DeepSpeed's op-loading print and
    megatron-core's notes on missing kernels used to fill most of this run's console. DeepSpeed's shared-memory
    kernel, which nothing in Parallax calls, used to be compiled on a machine's first run (34 s on 2 cores)."""
    extensions = tmp_path / "torch_extensions"  # where torch's JIT builds (and finds) compiled ops
    proc = parallax("train", *TINY, "parallel.zero_stage=3", "train.steps=5", f"logging.run_dir={tmp_path / 'run'}",
                    TORCH_EXTENSIONS_DIR=str(extensions))
    lines = console_lines(proc)
    assert proc.returncode == 0, "\n".join(lines[-50:])
    assert not extensions.exists() or not any(extensions.iterdir()), sorted(extensions.rglob("*"))
    assert all(line.startswith(("parallax: ", "step ", "eval after step ")) for line in lines), "\n".join(lines)
    assert len(lines) == len(set(lines)) and lines[-1].startswith("parallax: done: 5 steps"), "\n".join(lines)


def test_plan_prints_no_third_party_warning():
    proc = parallax("plan", "configs/gpt3-1.3b.yaml", "--nodes", "1", "--gpus-per-node", "8")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    assert proc.stdout.startswith("parallax plan: configs/gpt3-1.3b.yaml on 1 x 8 H100-80GB"), proc.stdout[:3000]


@pytest.mark.parametrize("read_by", ["every rank", "one rank"])
def test_bad_data_is_one_error_line(tmp_path, read_by):
    """With one shard, both ranks read the bad line and used to print the same error each. With a second,
    good shard, one rank alone reads it: it says so, and its peer, whose collective then fails, used to
    print a traceback of some 60 lines."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    bad = corpus / "a.jsonl"
    bad.write_text('{"text": "def f(): pass"}\n{"text": oops}\n', encoding="utf-8")
    if read_by == "one rank":
        (corpus / "b.jsonl").write_text("".join(json.dumps({"text": f"def g{i}(x):\n    return x * {i}\n"}) + "\n"
                                                for i in range(2000)), encoding="utf-8")
    proc = parallax("train", *TINY, "train.steps=3", f"data.sources=[{{path: {corpus}}}]",
                    f"logging.run_dir={tmp_path / 'run'}")
    lines = console_lines(proc)
    errors = [line for line in lines if line.startswith("parallax: error")]
    assert proc.returncode == 2 and len(errors) == 1, "\n".join(lines)
    assert errors[0].endswith(f"): {bad}: line 2 is malformed JSON (Expecting value); fix or remove that line")
    assert all(line.startswith("parallax: ") for line in lines), "\n".join(lines)  # no traceback
