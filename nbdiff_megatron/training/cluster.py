"""Running under a cluster scheduler (SLURM): the job's metadata, and the signal supervisor.

`job_metadata()` is what a run records about where it ran (job id, node list, restart count), in its
checkpoints, its `runs.jsonl` and its W&B config.

The supervisor sits between `srun` and `torchrun` on every node (slurm/nbdiff.sbatch):

    srun ... python -m nbdiff_megatron.training.cluster torchrun --nnodes=... -m nbdiff_megatron.cli train

SLURM signals every process of a job step: on `scancel --signal=USR1`, at the `--signal=USR1@N` warning,
and with SIGTERM on `scontrol requeue`, preemption and `scancel`. Left alone, torchrun dies of USR1 (its
default action) and raises `SignalException` on SIGTERM (exit 1, workers killed after 30 s), and a
training process that has not yet installed its handler dies of the signal or, ignoring it, loses it.
The supervisor therefore

- starts torchrun with SIGTERM, SIGUSR1 and SIGINT ignored and its signals-to-handle
  (`PET_SIGNALS_TO_HANDLE`) without them, so torchrun keeps running and just waits for its workers;
- records a signal it receives in a node-local file (NBDIFF_SIGNAL_FILE) and forwards it to the training
  processes: one that is not listening yet finds the file when it installs its handler
  (faults.PreemptionHandler), so an early warning is never lost;
- exits with torchrun's exit code (0 after a clean signal stop: the batch script then requeues the job
  because no completion marker was written).

Its signal handler only queues the signal; the main loop does the rest (`SignalRelay`), so a signal
that interrupts an import, a file write or the handling of the previous signal cannot crash it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Any

import psutil

from nbdiff_megatron.training.faults import SIGNAL_FILE_ENV

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# How often the supervisor's main loop passes queued signals on (and checks whether torchrun ended).
RELAY_INTERVAL_S = 0.1


def job_metadata() -> dict[str, Any]:
    """Where this process runs: host, and the SLURM job id / node list / restart count if any."""
    env = os.environ
    meta: dict[str, Any] = {"host": socket.gethostname()}
    for key, var in (
        ("job_id", "SLURM_JOB_ID"),
        ("array_job_id", "SLURM_ARRAY_JOB_ID"),
        ("array_task_id", "SLURM_ARRAY_TASK_ID"),
        ("job_name", "SLURM_JOB_NAME"),
        ("nodes", "SLURM_JOB_NODELIST"),
        ("num_nodes", "SLURM_JOB_NUM_NODES"),
        ("restart_count", "SLURM_RESTART_COUNT"),
        ("partition", "SLURM_JOB_PARTITION"),
    ):
        if env.get(var):
            meta[key] = env[var]
    return meta


def _ignore_signals() -> None:  # runs in the child between fork and exec
    for signum in FORWARDED:
        signal.signal(signum, signal.SIG_IGN)


def _descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


class SignalRelay:
    """Records the signals the supervisor receives and passes them on to the training processes.

    The signal handler (`handle`) only appends to a list: Python runs a handler between any two
    bytecodes of the main thread, so one that did more could run in the middle of an import (seeing
    the module half initialised), of a write to the same file, or of another invocation of itself
    (a second signal soon after the first: USR1 sent twice, a time-limit warning then a requeue).
    Everything else, the signal file, the log line and the `os.kill`s, happens in `relay`, which the
    supervisor's main loop calls; a signal that arrives meanwhile is queued for the next call.
    """

    def __init__(self, signal_file: str) -> None:
        self.signal_file = signal_file
        self.pending: list[int] = []

    def handle(self, signum: int, frame: object) -> None:
        self.pending.append(signum)

    def relay(self, child_pid: int | None) -> None:
        """Record and forward every queued signal (to the descendants of `child_pid`, torchrun's
        training processes; the signal file covers those that do not listen yet)."""
        while self.pending:
            signum = self.pending.pop(0)
            name = signal.Signals(signum).name
            if not os.path.exists(self.signal_file):  # the first signal names the stop
                tmp = f"{self.signal_file}.tmp"
                with open(tmp, "w") as f:
                    f.write(name)
                os.replace(tmp, self.signal_file)
            print(
                f"nbdiff supervisor: {name} received, passed on to the training processes",
                flush=True,
            )
            for pid in _descendants(child_pid) if child_pid is not None else []:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass


def supervise(command: list[str]) -> int:
    """Run `command` (torchrun ...) shielded from SIGTERM/SIGUSR1/SIGINT, forwarding them to its
    training processes; returns its exit code."""
    signal_file = os.environ.get(SIGNAL_FILE_ENV) or os.path.join(
        tempfile.gettempdir(),
        f"nbdiff-signal-{os.environ.get('SLURM_JOB_ID', 'local')}-{os.getpid()}",
    )
    if os.path.exists(signal_file):
        os.unlink(signal_file)  # left by an earlier attempt of a requeued job
    env = dict(os.environ)
    env[SIGNAL_FILE_ENV] = signal_file
    # torchrun's --signals-to-handle (default from PET_SIGNALS_TO_HANDLE), which it passes on in
    # TORCHELASTIC_SIGNALS_TO_HANDLE: without SIGTERM/SIGINT torchrun keeps the ignored disposition.
    env.setdefault("PET_SIGNALS_TO_HANDLE", "SIGHUP,SIGQUIT")
    env.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", env["PET_SIGNALS_TO_HANDLE"])
    relay = SignalRelay(signal_file)
    for signum in FORWARDED:
        signal.signal(signum, relay.handle)
    try:
        child = subprocess.Popen(command, env=env, preexec_fn=_ignore_signals)
        code = None
        while code is None:
            relay.relay(child.pid)
            try:
                code = child.wait(timeout=RELAY_INTERVAL_S)
            except subprocess.TimeoutExpired:
                pass
    finally:
        if os.path.exists(signal_file):
            os.unlink(signal_file)
    return code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    return supervise(argv)


if __name__ == "__main__":
    sys.exit(main())
