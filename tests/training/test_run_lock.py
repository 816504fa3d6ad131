"""One writer per save directory (issue 23 §2, docs/resume.md): the run lock, and torchrun workers
that stop when their launcher is gone."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nbdiff_megatron.errors import CheckpointError
from nbdiff_megatron.training import run_lock

from .runs import Launched, cli_command, train_in_process, wait_for


def _write_lock(save: Path, **holder) -> Path:
    save.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": 1, "job_id": None, "started": "then", **holder}
    path = save / run_lock.LOCK_FILE
    path.write_text(json.dumps(record) + "\n")
    return path


@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    lock, warning = run_lock.acquire(tmp_path)
    assert warning is None
    holder = json.loads((tmp_path / run_lock.LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    lock.release()
    assert not (tmp_path / run_lock.LOCK_FILE).exists()


def test_a_live_holder_is_refused_by_name(tmp_path: Path, live_process: int) -> None:
    path = _write_lock(tmp_path, pid=live_process, job_id="4711")
    with pytest.raises(CheckpointError) as caught:
        run_lock.acquire(tmp_path)
    message = str(caught.value)
    assert f"pid {live_process}" in message and "SLURM job 4711" in message
    assert socket.gethostname() in message and f"remove {path}" in message
    assert json.loads(path.read_text())["pid"] == live_process  # untouched


def test_a_lock_on_another_host_is_never_broken_here(tmp_path: Path) -> None:
    _write_lock(tmp_path, host="node-that-is-not-here", pid=_dead_pid())
    with pytest.raises(CheckpointError, match="node-that-is-not-here"):
        run_lock.acquire(tmp_path)


def test_stale_locks_are_taken_over_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, live_process: int
) -> None:
    dead = _dead_pid()
    _write_lock(tmp_path, pid=dead)  # killed with SIGKILL on this host
    lock, warning = run_lock.acquire(tmp_path)
    assert warning and f"process {dead} is no longer running" in warning
    lock.release()
    # A requeued SLURM job (same job id, maybe another node) takes over its own lock.
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    _write_lock(tmp_path, host="the-node-before", pid=live_process, job_id="777")
    lock, warning = run_lock.acquire(tmp_path)
    assert warning and "this SLURM job (777)" in warning
    lock.release()


def test_a_second_start_refuses_at_once_and_writes_nothing(
    corpus_prefix: str, tmp_path: Path, live_process: int
) -> None:
    save = tmp_path / "run"
    _write_lock(save, pid=live_process)
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match=f"pid {live_process}"):
        train_in_process(corpus_prefix, "--train.steps=2", f"--checkpoint.save={save}")
    assert time.monotonic() - t0 < 20  # before the model is built
    assert sorted(p.name for p in save.iterdir()) == [run_lock.LOCK_FILE]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.multirank
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_stop_when_torchrun_is_killed_and_release_the_lock(
    corpus_prefix: str, tmp_path: Path
) -> None:
    """torchrun killed under its workers (SIGKILL, or a signal sent to it alone): they used to train
    on without a parent, beside a re-run. While they run, a second start is refused by name."""
    save = tmp_path / "run"
    cmd = cli_command(corpus_prefix, "--train.steps=400", f"--checkpoint.save={save}", nproc=2)
    run = Launched(cmd, tmp_path / "run.log")
    try:
        started = re.compile(r"step\s+2/400")
        assert wait_for(lambda: started.search(run.output()), timeout=180), run.output()[-3000:]
        holder = json.loads((save / run_lock.LOCK_FILE).read_text())
        with pytest.raises(CheckpointError, match=f"pid {holder['pid']}"):
            run_lock.acquire(save)
        workers = _children(run.proc.pid)
        assert holder["pid"] in workers and len(workers) == 2
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait()
        assert wait_for(lambda: not any(_alive(p) for p in workers), timeout=60), run.output()[
            -3000:
        ]
        assert "launcher that started this worker (torchrun) is gone" in run.output()
        assert not (save / run_lock.LOCK_FILE).exists()
    finally:
        run.cleanup()
