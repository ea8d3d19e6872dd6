"""A real two-node SLURM cluster on this machine, for the tests of `parallax submit` and requeue.

Debian's `slurm-wlm` is built to run several `slurmd` on one host, each under its own node name
and port, so `slurmd -N n1` and `slurmd -N n2` make two nodes of one machine. Everything the
daemons write (munge key and socket, slurm.conf, state, spool, logs, pid files) lives under one
temporary directory; `SlurmCluster.env` is what a client (sbatch, scontrol, a test) needs to talk
to this cluster and no other. The configuration suits a container: no cgroups (processes are
tracked through /proc), no task binding, no accounting, one CPU per node, and a scheduler that
looks at the queue every second.

The binaries are installed with apt-get when missing (CI runs as root); when they cannot be, the
tests fail with one line saying so: they are never skipped.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
NODES = ("n1", "n2")


class SlurmUnavailable(RuntimeError):
    """The SLURM binaries are missing and could not be installed; the message says why."""


def ensure_installed() -> None:
    """Install Debian's slurm-wlm and munge unless their binaries are already on PATH (as root, like CI)."""
    if all(_which(name) for name in BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"the SLURM tests need {', '.join(PACKAGES)}; install them, or run the tests as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(install, env=env, capture_output=True, text=True)
    if proc.returncode:  # a fresh image may have no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
    missing = [name for name in BINARIES if not _which(name)]
    if missing:
        last = (proc.stdout + proc.stderr).strip().splitlines() or ["no output"]
        raise SlurmUnavailable(f"could not install {' '.join(PACKAGES)} with apt-get (missing: {', '.join(missing)}): {last[-1]}")


def _which(name: str):
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged, slurmctld and two slurmd (nodes n1, n2 in partition `debug`) under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.processes: list[subprocess.Popen] = []
        self.munge_socket = root / "munge" / "munge.socket"
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.env["PATH"] = f"{self.env.get('PATH', '')}:/usr/sbin:/sbin"

    # --- start and stop ---

    def start(self, timeout: float = 60) -> None:
        ensure_installed()
        self._start_munge()
        self._write_slurm_conf()
        for sub in ("state", "spool/n1", "spool/n2", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._daemon(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        for node in NODES:
            self._daemon(["slurmd", "-D", "-N", node, "-f", str(self.conf)], f"slurmd-{node}")
        self._wait_until_idle(timeout)

    def stop(self) -> None:
        """Cancel whatever jobs a failed test left behind, so no rank outlives the cluster, then stop the daemons."""
        if self.processes and self.conf.exists():
            self.run("scancel", "--full", "--partition=debug", check=False)
            deadline = time.time() + 60
            while self.run("squeue", "--noheader", check=False).stdout.strip() and time.time() < deadline:
                time.sleep(0.5)
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()

    def _start_munge(self) -> None:
        munge_dir = self.munge_socket.parent
        munge_dir.mkdir(parents=True, mode=0o700)
        key = munge_dir / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, env=self.env, capture_output=True)
        # --force: the key and socket sit under /tmp, whose permissions munged would otherwise refuse.
        self._daemon(["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                      f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
                      f"--seed-file={munge_dir / 'munged.seed'}"], "munged")
        deadline = time.time() + 20
        while not self.munge_socket.exists():
            self._check_alive()
            if time.time() > deadline:
                raise RuntimeError(f"munged never opened {self.munge_socket}; see {munge_dir / 'munged.log'}")
            time.sleep(0.1)

    def _write_slurm_conf(self) -> None:
        r = self.root
        ports = {node: _free_port() for node in NODES}
        nodes = "\n".join(f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs=1 State=UNKNOWN"
                          for node, port in ports.items())
        self.conf.write_text(f"""\
ClusterName=parallax-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/logs/slurmctld.log
SlurmdLogFile={r}/logs/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# A container: no cgroups, processes tracked through /proc, no CPU binding, no accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
ReturnToService=2
InactiveLimit=0
KillWait=30
MinJobAge=600
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, cmd: list[str], name: str) -> None:
        log = open(self.root / f"{name}.out", "w")
        self.processes.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def _check_alive(self) -> None:
        for proc in self.processes:
            if proc.poll() is not None:
                name = Path(proc.args[0]).name
                raise RuntimeError(f"{name} exited with code {proc.returncode} at start:\n{self.logs()}")

    def _wait_until_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        states = ""
        while time.time() < deadline:
            self._check_alive()
            proc = self.run("sinfo", "--noheader", "--Node", "--format=%N %t", check=False)
            states = proc.stdout.strip()
            if proc.returncode == 0 and sorted(states.splitlines()) == [f"{node} idle" for node in NODES]:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the nodes never became idle (sinfo: {states!r}):\n{self.logs()}")

    # --- talking to it ---

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, BatchFlag, ...)."""
        fields = {}
        for word in self.run("scontrol", "show", "job", "--oneliner", job_id).stdout.split():
            key, sep, value = word.partition("=")
            if sep:
                fields.setdefault(key, value)
        return fields

    def logs(self) -> str:
        tails = []
        for path in sorted([*self.root.glob("*.out"), *(self.root / "logs").glob("*.log")]):
            tails.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(tails)


if __name__ == "__main__":
    # python -m tests.slurm_cluster --install: install the binaries (CI, before the suite)
    # python -m tests.slurm_cluster DIR: bring a cluster up by hand until Ctrl-C
    import sys

    if sys.argv[1] == "--install":
        ensure_installed()
        sys.exit(0)
    cluster = SlurmCluster(Path(sys.argv[1]))
    try:
        cluster.start()
        print(f"up: export SLURM_CONF={cluster.conf}; Ctrl-C stops it", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
