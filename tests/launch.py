"""Launching test subprocesses: a clean environment, and torchrun with CPU ranks (gloo).

Every multi-rank test goes through here, so the launch (port, environment, timeout, the error
message with the output's tail) is written once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Set by an initialised process group of the test process (or an outer launcher): a child that
# inherited them would join that group instead of starting its own.
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# The CI's deprecation job sets this for the test process; children run as a user runs them (the
# tests of quiet output check the default), unless a test passes it in `extra`.
TEST_PROCESS_ONLY = ("NBDIFF_SHOW_DEPRECATIONS",)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child: no distributed variables (nor the CI's
    deprecation switch), 1 thread, offline hub,
    the repository on PYTHONPATH (torchrun runs scripts from tests/ that import the package); then
    `extra`."""
    dropped = DIST_VARS + TEST_PROCESS_ONLY
    env = {name: value for name, value in os.environ.items() if name not in dropped}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env.update(extra or {})
    return env


def torchrun_command(args: Sequence[str], *, nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run` on `nproc` local ranks and a free port, then `args`
    (a script and its arguments, or `-m module ...`)."""
    from nbdiff_megatron.model.parallel import free_port  # lazy: it imports torch

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *map(str, args),
    ]


def output_tail(proc: subprocess.CompletedProcess, chars: int = 3000) -> str:
    """The last `chars` characters of a finished run's stdout and of its stderr, for assertions."""
    return f"stdout:\n{proc.stdout[-chars:]}\nstderr:\n{proc.stderr[-chars:]}"


def run_torchrun(
    args: Sequence[str],
    *,
    nproc: int = 2,
    timeout: float,
    cwd: str | Path | None = None,
    extra_env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run `args` under torchrun on `nproc` ranks (cwd defaults to the repository) and wait at most
    `timeout` seconds; with `check`, assert exit code 0, showing the tail of the output if not."""
    proc = subprocess.run(
        torchrun_command(args, nproc=nproc),
        cwd=REPO if cwd is None else cwd,
        env=clean_env(extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, output_tail(proc)
    return proc
