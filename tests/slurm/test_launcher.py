"""slurm/nbdiff.sbatch on a real scheduler: completion, USR1 (twice, the batch shell included) ->
requeue -> exact resume, 2 nodes, `scontrol requeue` (SIGTERM). Jobs are submitted from a folder
outside the repository."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from nbdiff_megatron.training.logging import read_metrics
from tests.launch import REPO, clean_env
from tests.training.runs import BASE_OVERRIDES, wait_for

from .cluster import Cluster

SBATCH = str(REPO / "slurm" / "nbdiff.sbatch")
TINY = str(REPO / "examples" / "tiny_cpu.yaml")
KEYS = ("step", "loss", "mdm", "ar", "grad_norm", "block_size", "lr")
STEPS = 20
ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def _args(corpus: str, save: Path, *extra: str) -> list[str]:
    return [
        SBATCH,
        TINY,
        f"--data.data_path=[{corpus}]",
        f"--data.tokenizer_model={REPO / 'nbdiff_megatron' / 'assets' / 'tokenizer'}",
        *BASE_OVERRIDES,
        "--loss.validate=false",
        f"--train.steps={STEPS}",
        "--checkpoint.save_interval=1000",
        f"--checkpoint.save={save}",
        *extra,
    ]


def _env(nproc: int, **extra: str) -> dict[str, str]:
    env = clean_env({"NPROC_PER_NODE": str(nproc), "NBDIFF_ENV": sys.prefix, **extra})
    for name in ALLOC_CONF_VARS:  # the launcher's default applies unless a test sets one
        if name not in extra:
            env.pop(name, None)
    return env


def _log(submit_dir: Path, job: int) -> str:
    files = list(submit_dir.glob(f"*-{job}.out"))
    return files[0].read_text() if files else "(no log)"


def _finish(cluster: Cluster, job: int, submit_dir: Path, timeout: float = 900) -> dict:
    info = cluster.wait_state(
        job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout
    )
    assert info["JobState"] == "COMPLETED", f"{info}\n{_log(submit_dir, job)}"
    return info


def _release_when_requeued(cluster: Cluster, job: int) -> None:
    """A requeued job waits ~2 min (BeginTime) before it may start again; start it in 3 s.

    Not at once: slurmd refuses a job credential created in the second its previous one was
    revoked ("Killing non-startable batch JobId=N: Job credential revoked"), which the BeginTime
    delay exists to avoid; a quick release used to fail the job that way.
    """
    info = cluster.wait_state(job, ("PENDING",), timeout=600)
    assert int(info["Restarts"]) >= 1, info
    cluster.scontrol("update", f"jobid={job}", "starttime=now+3")


def _curve(save: Path) -> list[tuple]:
    return [tuple(r[k] for k in KEYS) for r in read_metrics(save / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(cluster: Cluster, corpus: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """(a) The tiny config through sbatch, 2 processes on one node, to completion."""
    submit_dir = tmp_path_factory.mktemp("submit_a")
    save = submit_dir / "run"
    job = cluster.sbatch(
        "--gpus-per-node=0",
        "--cpus-per-task=2",
        *_args(corpus, save),
        cwd=submit_dir,
        env=_env(2),
    )
    _finish(cluster, job, submit_dir)
    log = _log(submit_dir, job)
    assert "1 node(s) x 2 process(es)" in log, log
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTORCH_ALLOC_CONF=\n" in log, log
    marker = json.loads((save / "COMPLETE").read_text())
    assert marker["step"] == STEPS and marker["job"]["job_id"] == str(job), marker
    assert [r["step"] for r in read_metrics(save / "metrics.jsonl")] == list(range(1, STEPS + 1))
    return save


def test_a_tiny_run_completes_with_a_marker(reference: Path) -> None:
    runs = [json.loads(line) for line in (reference / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 1 and runs[0]["nodes"] and runs[0]["job_id"]


def test_b_usr1_requeues_and_resumes_bitwise(
    cluster: Cluster, corpus: str, reference: Path, submit_dir: Path
) -> None:
    """USR1 to the steps, then 0.1 s later USR1 to the whole job, batch shell included (`--full`):
    the shell survives (it traps USR1), the supervisor takes two signals in quick succession, the job
    requeues itself and the resumed run is bitwise the uninterrupted one."""
    save = submit_dir / "run"
    job = cluster.sbatch(
        "--gpus-per-node=0",
        "--cpus-per-task=2",
        *_args(corpus, save),
        cwd=submit_dir,
        env=_env(2),
    )
    assert wait_for(lambda: len(read_metrics(save / "metrics.jsonl")) >= 2, timeout=900), _log(
        submit_dir, job
    )
    cluster.run("scancel", "--signal=USR1", str(job))
    time.sleep(0.1)
    cluster.run("scancel", "--full", "--signal=USR1", str(job))
    _release_when_requeued(cluster, job)
    info = _finish(cluster, job, submit_dir)
    log = _log(submit_dir, job)
    assert "received SIGUSR1" in log and "requeueing job" in log, log
    assert "nbdiff.sbatch: SIGUSR1 received" in log, log  # the batch shell got it, and lived
    assert "Traceback" not in log, log
    assert int(info["Restarts"]) == 1 and info["ExitCode"] == "0:0", info
    starts = [json.loads(line) for line in (save / "runs.jsonl").read_text().splitlines()]
    assert len(starts) == 2 and 2 <= starts[1]["start_step"] < STEPS, starts
    assert starts[1]["restart_count"] == "1"
    # The same per-step losses as the uninterrupted run, bit for bit (CPU, fp32, gloo).
    assert _curve(save) == _curve(reference)


def test_c_two_nodes_one_process_each(cluster: Cluster, corpus: str, submit_dir: Path) -> None:
    save = submit_dir / "run"
    job = cluster.sbatch(
        "--nodes=2",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        *_args(corpus, save, "--train.steps=3"),
        cwd=submit_dir,
        env=_env(1, PYTORCH_ALLOC_CONF="expandable_segments:False"),
    )
    _finish(cluster, job, submit_dir)
    log = _log(submit_dir, job)
    assert "2 node(s) x 1 process(es)" in log and "dp 2 = 2 processes" in log, log
    # The user's allocator settings are kept, and the launcher adds none of its own.
    assert "PYTORCH_CUDA_ALLOC_CONF= PYTORCH_ALLOC_CONF=expandable_segments:False\n" in log, log
    assert json.loads((save / "COMPLETE").read_text())["step"] == 3
    start = json.loads((save / "runs.jsonl").read_text().splitlines()[0])
    assert start["num_nodes"] == "2" and re.search(r"nbdiff\[?a", start["nodes"]), start


def test_d_scontrol_requeue_sigterm_resumes_with_zero_exit_codes(
    cluster: Cluster, corpus: str, submit_dir: Path
) -> None:
    save = submit_dir / "run"
    job = cluster.sbatch(
        "--gpus-per-node=0",
        "--cpus-per-task=2",
        *_args(corpus, save),
        cwd=submit_dir,
        env=_env(2),
    )
    assert wait_for(lambda: len(read_metrics(save / "metrics.jsonl")) >= 2, timeout=900), _log(
        submit_dir, job
    )
    cluster.scontrol("requeue", str(job))
    _release_when_requeued(cluster, job)
    info = _finish(cluster, job, submit_dir)
    log = _log(submit_dir, job)
    assert "received SIGTERM" in log and "saved and stopped on SLURM's SIGTERM" in log, log
    assert "SignalException" not in log and "training failed" not in log, log
    assert info["ExitCode"] == "0:0" and info.get("DerivedExitCode", "0:0") == "0:0", info
    assert [r["step"] for r in read_metrics(save / "metrics.jsonl")] == list(range(1, STEPS + 1))
    assert json.loads((save / "COMPLETE").read_text())["step"] == STEPS
