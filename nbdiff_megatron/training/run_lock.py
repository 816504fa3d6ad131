"""One writer per save directory: the run lock `<save>/LOCK` (docs/resume.md).

Rank 0 of a run creates the lock file with O_CREAT | O_EXCL (atomic on local file systems and on NFSv3+ /
Lustre / GPFS) before it writes anything into the save directory, and removes it when the run ends. The
file holds the holder's host, pid, SLURM job id and start time, so that a second start can refuse at once
naming the holder. A lock is taken over, with a warning, when its holder is certainly gone:

- the same host and its pid is no longer running (a run killed with SIGKILL leaves its lock behind);
- the same SLURM job id (a requeued job restarts under its own id, possibly on another node).

A lock of a live process, or of a process on another host that we cannot see, is never broken here: the
message names the holder and says how to break it by hand once that run is known to be gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbdiff_megatron.errors import CheckpointError

LOCK_FILE = "LOCK"


def _holder_record() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    job = f", SLURM job {holder['job_id']}" if holder.get("job_id") else ""
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')}{job}, started "
        f"{holder.get('started', '?')}"
    )


def _stale_reason(holder: dict[str, Any]) -> str | None:
    """Why the lock's holder is gone (so the lock may be taken over), or None."""
    me = _holder_record()
    if holder.get("job_id") and holder.get("job_id") == me["job_id"]:
        return f"it belongs to this SLURM job ({me['job_id']}), restarted"
    if holder.get("host") != me["host"]:
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return "it names no process"
    if pid == me["pid"]:
        return "this process took it earlier and did not release it"
    if not _pid_running(pid):
        return f"process {pid} is no longer running (killed?)"
    return None


@dataclass
class RunLock:
    """The lock of one save directory, held by this process."""

    path: Path
    record: dict[str, Any]

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        try:
            if json.loads(self.path.read_text()) == self.record:
                self.path.unlink()
        except (OSError, ValueError):
            pass


def _create(path: Path, record: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record) + "\n")
    return True


def _read(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def acquire(save: str | Path) -> tuple[RunLock, str | None]:
    """Take the lock of `save` (which must exist); returns the lock and a warning when a stale lock
    was taken over. Raises CheckpointError naming the holder when another run holds it."""
    path = Path(save) / LOCK_FILE
    record = _holder_record()
    if _create(path, record):
        return RunLock(path, record), None
    holder = _read(path)
    reason = _stale_reason(holder) if holder else "it is empty or unreadable"
    if reason is None:
        raise CheckpointError(
            f"checkpoint.save={save} is in use by another run ({_describe(holder)}; {path}): two "
            "runs writing one save directory would interleave their checkpoints and metrics. Wait "
            "for it to end, stop it, or use another --checkpoint.save. If that run is known to be "
            f"gone (e.g. its node died), remove {path} and start again"
        )
    # Replace atomically: a concurrent starter that also saw the stale lock loses the O_EXCL race.
    path.unlink(missing_ok=True)
    if not _create(path, record):
        raise CheckpointError(
            f"checkpoint.save={save}: another run took the lock {path} at the same moment "
            f"({_describe(_read(path))}); use another --checkpoint.save or wait for it to end"
        )
    warning = f"WARNING: took over the stale run lock {path} of {_describe(holder)}: {reason}"
    return RunLock(path, record), warning
