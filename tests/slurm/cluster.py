"""A real SLURM cluster on this machine for the launcher tests: two node names on one host.

Debian's slurm 22.05 packages are installed when missing (as root, `apt-get update` first). The daemons
run from a config in a temporary folder, on loopback, and are stopped by PID at the end. Facts behind the
config: docs/SLURM.md.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.launch import DIST_VARS

NODES = ("nbdiffa", "nbdiffb")
PACKAGES = ("slurmctld", "slurmd", "slurm-client")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started here (the reason is the message)."""


def ensure_installed() -> None:
    """Install slurmctld / slurmd / slurm-client with apt when missing."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("SLURM is not installed and installing it needs root (apt-get)")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("SLURM is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise SlurmUnavailable(
                f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr[-500:]}"
            )
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch")):
        raise SlurmUnavailable(f"apt-get installed {PACKAGES} but the binaries are missing")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _ensure_hosts(names: tuple[str, ...]) -> None:
    """The node names must resolve (slurmd looks its own name up): map them to 127.0.0.1."""
    hosts = Path("/etc/hosts")
    text = hosts.read_text()
    missing = [n for n in names if not re.search(rf"^\s*127\.0\.0\.1\s.*\b{n}\b", text, re.M)]
    if missing:
        with hosts.open("a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}\n")


class Cluster:
    """slurmctld + one slurmd per node name, from a config under `root`."""

    def __init__(self, root: Path, cpus: int = 2) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.cpus = cpus
        self.pids: list[int] = []
        self._procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        # Without this process's distributed variables: an in-process test earlier in the session
        # may have set MASTER_PORT to a store this pytest process still hosts, and sbatch exports
        # the submitting environment to the job.
        env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
        return {**env, "SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        ctld, *node_ports = _free_ports(1 + len(NODES))
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        nodes = "\n".join(
            f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={self.cpus} RealMemory=4000 State=UNKNOWN"
            for name, port in zip(NODES, node_ports)
        )
        r = self.root
        # sched_interval / bf_interval = 1 s: a requeued job becomes eligible at its BeginTime with no
        # event to schedule it, and waited for the periodic passes (60 s and 30 s by default).
        # KillWait=90 (sites: 30-120 s): the grace after SIGTERM in which a job saves and reports it;
        # 30 s was too short for a test job on a 2-core machine running the rest of the suite.
        self.conf.write_text(
            f"""ClusterName=nbdiffci
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
KillWait=90
SchedulerParameters=defer_batch,sched_interval=1,bf_interval=1
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def start(self) -> None:
        self.write_config()
        _ensure_hosts(NODES)
        log = (self.root / "log" / "daemons.out").open("w")
        self._procs.append(
            subprocess.Popen(
                ["slurmctld", "-D", "-i", "-f", str(self.conf)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        for name in NODES:
            (self.root / "spool" / name).mkdir(parents=True, exist_ok=True)
            self._procs.append(
                subprocess.Popen(
                    ["slurmd", "-D", "-N", name, "-f", str(self.conf)],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        self.pids = [p.pid for p in self._procs]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = self.scontrol("show", "nodes", check=False)
            if out.count("State=IDLE") == len(NODES):
                return
            for p in self._procs:
                if p.poll() is not None:
                    raise SlurmUnavailable(f"a SLURM daemon exited: {self.daemon_log()}")
            time.sleep(0.5)
        raise SlurmUnavailable(f"the nodes did not come up: {out}\n{self.daemon_log()}")

    def _step_daemons(self) -> list[int]:
        """PIDs of this cluster's slurmstepd processes (their environment names our config)."""
        import psutil

        pids = []
        for proc in psutil.process_iter(["name"]):
            try:
                if proc.info["name"] == "slurmstepd" and proc.environ().get("SLURM_CONF") == str(
                    self.conf
                ):
                    pids.append(proc.pid)
            except psutil.Error:
                continue
        return pids

    def daemon_log(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            parts.append(f"== {f.name}\n{f.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what is left, then stop the daemons by PID (and their job step daemons)."""
        subprocess.run(
            ["scancel", "--full", "--partition=debug"], env=self.env, capture_output=True
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self._step_daemons():
            time.sleep(0.5)
        for pid in self._step_daemons():  # slurmstepd outlives slurmd: end ours by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self._procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self._procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    # ------------------------------------------------------------------ client commands

    def run(
        self,
        *cmd: str,
        check: bool = True,
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> str:
        proc = subprocess.run(
            list(cmd),
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=60,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed: {proc.stdout}{proc.stderr}")
        return proc.stdout + proc.stderr

    def scontrol(self, *args: str, check: bool = True) -> str:
        return self.run("scontrol", *args, check=check)

    def sbatch(self, *args: str, cwd: str | Path, env: dict[str, str] | None = None) -> int:
        out = self.run("sbatch", "--parsable", *args, cwd=cwd, env=env)
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as key=value pairs."""
        text = self.scontrol("show", "job", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_state(self, job_id: int, states: tuple[str, ...], timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        out = Path(info.get("StdOut", "/nonexistent"))
        log = out.read_text()[-4000:] if out.is_file() else "(no log)"
        raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {info}\n{log}")
