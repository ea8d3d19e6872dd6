"""Issue 14 point 9: a console a user can read.

The CLI's help is instant and says what Parallax is.
"""
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARALLAX = [sys.executable, "-c", "from launcher.cli import main; main()"]
COMMANDS = ("train", "checkpoint", "prepare-data", "prepare-tokenizer", "plan", "submit", "status")
HEAVY_MODULES = ("torch", "deepspeed", "megatron", "datasets", "pydantic", "launcher.config")


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
