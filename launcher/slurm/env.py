"""torch's env:// rendezvous for ranks that srun started.

srun starts one process per task and tells each who it is in SLURM's variables; torch's process
group reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. This module fills in the
second set from the first, so the same per-rank entry (`python -m launcher.entry`) runs under
torchrun and under srun, on any number of nodes, with no hostfile:

- rank, world size and local rank are SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID;
- the master is the first node of the step (where srun puts task 0), by the address SLURM itself
  knows it by (`scontrol show node`'s NodeAddr), so node names need not be in DNS;
- the port is derived from the job id: every rank computes the same one, and two jobs sharing a
  node rarely collide. A requeued job keeps its id, hence its port, after its previous run ended.
"""
from __future__ import annotations

import os
import subprocess
from typing import MutableMapping

PORT_BASE, PORT_SPAN = 15000, 15000  # below Linux's ephemeral range (32768+), above well-known services


class SlurmError(RuntimeError):
    """SLURM's environment or tools could not tell this rank where its peers are; the message says why."""


def set_torch_rendezvous(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Fill in torch's variables from SLURM's when this process is an srun task and they are absent.

    Returns whether it did. A launcher that already set RANK (torchrun, also inside a SLURM job) wins.
    """
    if "RANK" in environ or "SLURM_STEP_ID" not in environ:
        return False
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["WORLD_SIZE"] = environ["SLURM_NTASKS"]
    environ["LOCAL_RANK"] = environ["SLURM_LOCALID"]
    environ.setdefault("MASTER_ADDR", node_address(first_node(environ["SLURM_STEP_NODELIST"])))
    environ.setdefault("MASTER_PORT", str(master_port(environ["SLURM_JOB_ID"])))
    return True


def master_port(job_id: str) -> int:
    return PORT_BASE + int(job_id) % PORT_SPAN


def first_node(nodelist: str) -> str:
    """The first host of a compressed node list such as `gpu[003-010,012]`, expanded by SLURM."""
    hosts = _scontrol("show", "hostnames", nodelist).split()
    if not hosts:
        raise SlurmError(f"scontrol show hostnames {nodelist} named no host")
    return hosts[0]


def node_address(node: str) -> str:
    """The address slurmctld reaches `node` at (its NodeAddr; the node name when none is configured)."""
    for field in _scontrol("show", "node", "--oneliner", node).split():
        key, _, value = field.partition("=")
        if key == "NodeAddr" and value:
            return value
    raise SlurmError(f"scontrol show node {node} gave no NodeAddr")


def _scontrol(*args: str) -> str:
    try:
        proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmError(f"scontrol {' '.join(args)} failed ({e}); is SLURM's client installed on this node?") from None
    if proc.returncode:
        said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()  # "not found" goes to stdout
        raise SlurmError(f"scontrol {' '.join(args)} failed: {said[0] if said else f'exit code {proc.returncode}'}")
    return proc.stdout
