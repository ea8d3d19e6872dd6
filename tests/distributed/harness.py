"""Run many distributed scenarios in one torchrun launch per world size, and report each separately.

Importing megatron-core and DeepSpeed costs ~8 s per rank, so each world size is launched once and
runs every scenario registered for it in turn, each in its own try-block: a failing scenario writes
its traceback and the next one still runs. Rank 0 saves what the scenario returns to
`<out>/<name>.pt`, which the pytest side compares against the single-process reference.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
SCENARIOS: dict[str, tuple[int, Callable]] = {}
LAUNCH_FIRST: dict[int, set[int]] = {}  # world size -> world sizes whose scenarios write files it reads


def scenario(world_size: int, reads_from: int | None = None):
    """`reads_from`: the world size whose launch writes what this scenario reads (under $PARALLAX_SCENARIO_DIR)."""
    def register(fn):
        SCENARIOS[fn.__name__] = (world_size, fn)
        if reads_from is not None:
            LAUNCH_FIRST.setdefault(world_size, set()).add(reads_from)
        return fn
    return register


def import_scenarios() -> None:
    """Register every scenario: they live in tests/distributed/scenarios*.py, one module per area."""
    for path in sorted(Path(__file__).parent.glob("scenarios*.py")):
        importlib.import_module(f"tests.distributed.{path.stem}")


def launch(world_size: int, out_dir: Path, timeout: float = 900) -> None:
    """Start `world_size` local ranks running every scenario registered for that world size."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu",
           "PARALLAX_SCENARIO_DIR": str(out_dir)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
           "-m", "tests.distributed.harness", str(out_dir), str(world_size)]
    with open(out_dir / f"launch-{world_size}.log", "w") as log:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)


def result(out_dir: Path, name: str):
    """What rank 0 saved for scenario `name`, or an AssertionError carrying the rank's traceback."""
    import torch

    artifact, error = out_dir / f"{name}.pt", out_dir / f"{name}.error"
    if artifact.exists():
        return torch.load(artifact, weights_only=False)
    if error.exists():
        raise AssertionError(f"scenario {name} failed:\n{error.read_text()}")
    logs = "\n".join(p.read_text()[-3000:] for p in out_dir.glob("launch-*.log"))
    raise AssertionError(f"scenario {name} produced nothing; launch log tail:\n{logs}")


def _run_all(out_dir: Path, world_size: int) -> None:
    import torch
    import torch.distributed as dist

    # Run as __main__, this module is not the `tests.distributed.harness` the scenarios register into.
    from tests.distributed.harness import SCENARIOS as registered, import_scenarios

    import_scenarios()

    rank = int(os.environ["RANK"])
    for name, (size, fn) in registered.items():
        if size != world_size:
            continue
        started = time.perf_counter()
        try:
            value = fn()
            if rank == 0:
                torch.save(value, out_dir / f"{name}.pt")
                print(f"scenario {name}: {time.perf_counter() - started:.1f} s", flush=True)
        except Exception:
            (out_dir / f"{name}.error").write_text(f"rank {rank}:\n{traceback.format_exc()}")
            if world_size > 1:
                raise  # the other ranks may be blocked in a collective; a clean stop beats a hang
            continue
        if dist.is_initialized():
            dist.barrier()
            _destroy_scenario_groups()


def _destroy_scenario_groups() -> None:
    """Destroy every process group but the world and the control groups, as a scenario's process ends.

    A training process builds its groups once, but here every scenario rebuilds them, and megatron's
    destroy_model_parallel only forgets its groups: each stays alive with its gloo threads and sockets
    (two worker threads and a TCP loop apiece). Over a launch's scores of scenarios that grew to
    thousands of threads per rank, and every later scenario ran slower for it. torch lists the groups
    only in its private `_world.pg_map`; this is test code, and it runs after the scenario's barrier."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _world

    from parallel.topology import _control_groups

    for group in list(_world.pg_map):
        if group is not dist.GroupMember.WORLD and group not in _control_groups:
            dist.destroy_process_group(group)


if __name__ == "__main__":
    _run_all(Path(sys.argv[1]), int(sys.argv[2]))
