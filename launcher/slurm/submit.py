"""`parallax submit CONFIG --nodes N --gpus-per-node G [...]`: render an sbatch script, plan, submit.

The script is rendered from `slurm/job.sbatch` and written into the run directory, so what ran is
next to what it produced; `--dry-run` prints it and submits nothing. Before a GPU job queues, the
layout goes through `parallax plan` (issue 8): a layout that cannot fit is refused with the plan's
advice. `--gpus-per-node 0` submits a CPU job (gloo, `--tasks-per-node` ranks per node), for which
there is no GPU memory to plan: the plan is skipped and the world size is only checked against the
config (a multiple of tp x pp: each pipeline stage is a whole group of tp x dp ranks). A GPU job takes whole nodes and shows every GPU of a node to each of its ranks; a node's
cores are split evenly between its ranks unless --cpus-per-task says otherwise; srun ends every rank
when one fails (the rendered script says why, in its comments). Every job id submitted for a run is
appended to RUN_DIR/slurm-jobs, which `parallax status` reads; while one of them is queued or
running, another submission for the same run directory is refused, since two jobs would write the
same checkpoints.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from launcher.arg_types import positive_int
from launcher.plan.hardware import GPUS, GiB, Cluster
from launcher.slurm.jobs import active_job, record_job

# The config and the errors (which import torch) are imported by the functions that use them, so
# that `parallax --help` and `parallax submit --help` are instant.
if TYPE_CHECKING:
    from launcher.config import RunConfig

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "job.sbatch"
SCRIPT_NAME = "job.sbatch"
DEFAULT_WARNING_SECONDS = 300
TIME_FORMATS = ("MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, DAYS-HOURS, DAYS-HOURS:MINUTES or "
                "DAYS-HOURS:MINUTES:SECONDS")  # sbatch --time's
SLURM_TIME = re.compile(r"(?:([0-9]+)-)?([0-9]+)(?::([0-9]+))?(?::([0-9]+))?")
CPU_ENVIRONMENT = "export DS_ACCELERATOR=cpu"
GPU_ENVIRONMENT = """\
export DS_ACCELERATOR=cuda
# One hardware queue per GPU, so kernels start in the order they were issued: Megatron's tensor-parallel
# communication must start before the GEMM it overlaps. srun's --gpu-bind=none shows every GPU of the
# node to each rank (it takes cuda:LOCAL_RANK), so NCCL can copy between them directly.
export CUDA_DEVICE_MAX_CONNECTIONS=1"""
GPU_SRUN_OPTIONS = " --gpu-bind=none"
EXCLUSIVE_NODES = """\
# Whole nodes, with all their memory: no other job shares these GPUs, their cores, NICs or PCIe.
#SBATCH --exclusive
#SBATCH --mem=0"""


def add_submit_command(commands) -> None:
    parser = commands.add_parser("submit", help="submit a training run to SLURM (sbatch), requeued until it finishes")
    parser.add_argument("config", help="run config YAML, e.g. configs/gpt3-1.3b.yaml")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="dotted overrides, e.g. parallel.tp=2 train.steps=1000")
    parser.add_argument("--nodes", type=int, required=True, help="nodes to allocate")
    parser.add_argument("--gpus-per-node", type=int, required=True,
                        help="GPUs per node, one rank each; 0 submits a CPU job (gloo) and skips the GPU plan")
    parser.add_argument("--tasks-per-node", type=positive_int, default=None,
                        help="ranks per node (default: --gpus-per-node, or 1 for a CPU job)")
    parser.add_argument("--cpus-per-task", type=int, default=None,
                        help="cores per rank, for its data workers and threads (default: each node's cores split "
                        "evenly between its ranks; a GPU job takes whole nodes)")
    parser.add_argument("--gpu", default="h100", help=f"GPU type for the plan, one of {', '.join(GPUS)} (default h100)")
    parser.add_argument("--partition", help="sbatch --partition")
    parser.add_argument("--time", help="sbatch --time, e.g. 04:00:00")
    parser.add_argument("--account", help="sbatch --account")
    parser.add_argument("--warning-seconds", type=positive_int, default=DEFAULT_WARNING_SECONDS,
                        help="ask SLURM for the warning signal this long before the time limit, to save and "
                        "requeue (default %(default)s; leave time for one step and a save)")
    parser.add_argument("--dry-run", action="store_true", help="print the script; submit and write nothing")
    parser.set_defaults(run=_run)


def _run(args) -> None:
    from launcher.config import ConfigError, load_config

    cfg = load_config(args.config, args.overrides)
    if args.nodes < 1 or args.gpus_per_node < 0:
        raise ConfigError(f"--nodes={args.nodes} --gpus-per-node={args.gpus_per_node}: need 1+ nodes and 0+ GPUs")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task={args.cpus_per_task}: give 1 or more, or leave it out to split each "
                          "node's cores between its ranks")
    time_limit = time_limit_seconds(args.time) if args.time else None
    if time_limit is not None and args.warning_seconds >= time_limit:
        raise ConfigError(f"--warning-seconds={args.warning_seconds} is not shorter than --time={args.time} "
                          f"({time_limit} s): the job would be told to stop before it trained; lower "
                          "--warning-seconds or raise --time")
    tasks_per_node = args.tasks_per_node or args.gpus_per_node or 1
    if args.gpus_per_node and tasks_per_node != args.gpus_per_node:
        raise ConfigError(f"--tasks-per-node={tasks_per_node} must equal --gpus-per-node={args.gpus_per_node}: "
                          "one rank per GPU")
    cfg.check_world_size(args.nodes * tasks_per_node)
    if args.gpus_per_node:
        _refuse_unless_it_fits(cfg, args)
    script = render_script(cfg, args, tasks_per_node)
    if args.dry_run:
        print(script, end="")
        return
    run_dir = Path(cfg.logging.run_dir).resolve()
    if active := active_job(run_dir):
        raise ConfigError(f"job {active[0]} of run {run_dir} is still {active[1]}; one job at a time writes a run "
                          f"directory: wait for it, or `scancel {active[0]}` first")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / SCRIPT_NAME
    path.write_text(script)
    job_id = _sbatch(path)
    record_job(run_dir, job_id)
    print(f"parallax: submitted job {job_id}: {path}; output in {run_dir}/slurm-{job_id}.out; "
          f"`parallax status {cfg.logging.run_dir}` follows it")


def time_limit_seconds(time: str) -> Optional[int]:
    """sbatch --time in seconds, None for no limit. Read here, so that a malformed one is refused before the
    plan rather than by sbatch after it, and the warning can be checked to come inside the job."""
    from launcher.config import ConfigError

    if time.lower() in ("infinite", "unlimited"):
        return None
    match = SLURM_TIME.fullmatch(time)
    if match is None:
        raise ConfigError(f"--time={time} is not a SLURM time limit; give {TIME_FORMATS}, e.g. 04:00:00")
    days, *clock = match.groups()
    numbers = [int(n) for n in clock if n is not None]
    if days is not None:
        hours, minutes, seconds = (*numbers, 0, 0)[:3]
    elif len(numbers) == 3:
        hours, minutes, seconds = numbers
    else:
        hours, (minutes, seconds) = 0, (*numbers, 0)[:2]
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds or None  # sbatch: 0 imposes no limit


def _refuse_unless_it_fits(cfg: RunConfig, args) -> None:
    """Plan the layout on the GPUs asked for; print the plan and its advice and exit 1 when it does not fit."""
    from launcher.plan.cli import render, render_advice
    from launcher.plan.layout import advice, plan

    cluster = Cluster.of(args.nodes, args.gpus_per_node, args.gpu)
    planned = plan(cfg, cluster)
    if planned.fits:
        print(f"parallax submit: plan: {planned.memory.total / GiB:.2f} GiB of {cluster.usable_bytes / GiB:.2f} "
              f"usable per {cluster.gpu.name} fits; ~{planned.step.seconds:.3f} s/step estimated", file=sys.stderr)
        return
    print(f"parallax submit: refused: the layout does not fit {cluster.describe()}; nothing was submitted")
    print(render(planned))
    print(render_advice(advice(planned, planned.step.efficiency)))
    sys.exit(1)


def render_script(cfg: RunConfig, args, tasks_per_node: int) -> str:
    """The sbatch script for this run: the template with every field filled in, shell-quoted."""
    from launcher.config import ConfigError
    from launcher.errors import REQUEUE_EXIT_CODE

    run_dir = Path(cfg.logging.run_dir).resolve()
    for what, path in (("logging.run_dir", run_dir), ("the working directory", Path.cwd())):
        if any(c.isspace() for c in str(path)):
            raise ConfigError(f"{what} {str(path)!r} contains whitespace, which #SBATCH lines cannot hold; use a path without")
    gpu_job = args.gpus_per_node > 0
    resources = [f"--gpus-per-node={args.gpus_per_node}" if gpu_job else None,
                 f"--cpus-per-task={args.cpus_per_task}" if args.cpus_per_task else None,
                 f"--partition={args.partition}" if args.partition else None,
                 f"--time={args.time}" if args.time else None,
                 f"--account={args.account}" if args.account else None]
    resource_lines = [f"#SBATCH {r}" for r in resources if r] + ([EXCLUSIVE_NODES] if gpu_job else [])
    if not TEMPLATE.is_file():
        raise ConfigError(f"the sbatch template {TEMPLATE} is missing; `parallax submit` runs from a source checkout "
                          "installed with `pip install -e .` (as `make demo` does)")
    return render(TEMPLATE.read_text(), {
        "run_dir": str(run_dir),
        "job_name": run_dir.name,
        "nodes": str(args.nodes),
        "tasks_per_node": str(tasks_per_node),
        "resource_lines": "\n".join(resource_lines) or "# (no partition, time or account given)",
        "workdir": str(Path.cwd()),
        "warning_seconds": str(args.warning_seconds),
        "environment": GPU_ENVIRONMENT if gpu_job else CPU_ENVIRONMENT,
        "srun_options": GPU_SRUN_OPTIONS if gpu_job else "",
        "python": shlex.quote(sys.executable),
        "config": shlex.quote(str(Path(args.config).resolve())),
        "overrides": "".join(f" {shlex.quote(o)}" for o in args.overrides),
        "requeue_exit_code": str(REQUEUE_EXIT_CODE),
        "command": shlex.join(["parallax", *(a for a in sys.argv[1:] if a != "--dry-run")]),
    })


def render(template: str, fields: dict[str, str]) -> str:
    """Fill `{{ name }}` placeholders; every placeholder must have a field and every field a placeholder."""
    used = set(re.findall(r"{{ (\w+) }}", template))
    if used != set(fields):
        raise ValueError(f"template fields {sorted(used)} do not match {sorted(fields)}")
    return re.sub(r"{{ (\w+) }}", lambda m: fields[m.group(1)], template)


def _sbatch(script: Path) -> str:
    from launcher.config import ConfigError

    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch is not on PATH; run `parallax submit` on a SLURM login node, "
                          f"or submit {script} from one")
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode:
        print(f"parallax: error: sbatch refused {script}: {proc.stderr.strip()}", file=sys.stderr)
        sys.exit(proc.returncode)
    return proc.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"
