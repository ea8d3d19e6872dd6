"""Run many distributed scenarios in one torchrun launch per world size, and report each separately.

Importing megatron-core and DeepSpeed costs ~8 s per rank, so each world size is launched once and
runs every scenario registered for it in turn, each in its own try-block: a failing scenario writes
its traceback and the next one still runs. Rank 0 saves what the scenario returns to
`<out>/<name>.pt`, which the pytest side compares against the single-process reference, and logs
how long each scenario took.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import threading
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


def launch_order() -> list[int]:
    """Every registered world size once, each after the launches whose files it reads."""
    order: list[int] = []

    def visit(world_size: int) -> None:
        for earlier in sorted(LAUNCH_FIRST.get(world_size, ())):
            visit(earlier)
        if world_size not in order:
            order.append(world_size)

    for world_size in sorted({size for size, _ in SCENARIOS.values()}):
        visit(world_size)
    return order


def start(world_size: int, out_dir: Path) -> subprocess.Popen:
    """Start `world_size` local ranks running every scenario registered for that world size, at the lowest CPU
    priority (see BackgroundLaunches)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu",
           "PARALLAX_SCENARIO_DIR": str(out_dir)}
    cmd = ["nice", "-n", "19", sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={world_size}", "-m", "tests.distributed.harness", str(out_dir), str(world_size)]
    with open(out_dir / f"launch-{world_size}.log", "w") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


class BackgroundLaunches:
    """Every world size's launch, one after another on a thread of its own, from when the test session starts.

    Most of the suite starts processes and waits on them (their imports, signals, SLURM), which leaves a core
    idle much of the time; at the lowest CPU priority the launches fill it without slowing those tests. A test
    waits only for the launch it reads from, and a launch still running `timeout` seconds after a test began
    waiting is stopped (a hang), so that its scenarios report the tail of its log."""

    def __init__(self, out_dir: Path, timeout: float = 900):
        self.out_dir, self.timeout = out_dir, timeout
        self.finished = {world_size: threading.Event() for world_size in launch_order()}
        self._lock = threading.Lock()
        self._running: subprocess.Popen | None = None
        self._stopping = False
        threading.Thread(target=self._launch_all, daemon=True).start()

    def _launch_all(self) -> None:
        for world_size, finished in self.finished.items():
            with self._lock:
                if self._stopping:
                    break
                self._running = start(world_size, self.out_dir)
            self._running.wait()
            finished.set()
        for finished in self.finished.values():
            finished.set()

    def wait_for(self, world_size: int) -> None:
        while not self.finished[world_size].wait(self.timeout):
            self._kill_running()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._kill_running()

    def _kill_running(self) -> None:
        """torchrun and its ranks, which it starts in sessions of their own (so no one signal reaches them all)."""
        import psutil

        with self._lock:
            if self._running is None or self._running.poll() is not None:
                return
            launcher = psutil.Process(self._running.pid)
            for process in [*launcher.children(recursive=True), launcher]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()


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
