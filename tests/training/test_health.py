"""Run health: spikes, the last healthy checkpoint, the completion marker, Ctrl-C, early signals,
the torchrun supervisor, and no orphan writer processes after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from nbdiff_megatron.training import checkpointing
from nbdiff_megatron.training.faults import (
    HealthyCheckpoints,
    LevelShift,
    LevelShiftGuard,
    PreemptionHandler,
    SpikeGuard,
    TrainingHalted,
)
from nbdiff_megatron.training.logging import read_metrics
from tests.launch import REPO, clean_env

from .runs import (
    Launched,
    cli_command,
    tiny_overrides,
    torchrun_command,
    train_in_process,
    wait_for,
)


def test_spike_guard_watches_a_full_window_per_block_size() -> None:
    guard = SpikeGuard(loss_factor=3.0, grad_factor=10.0, window=3, max_consecutive=2)
    for step, loss in enumerate([2.0, 2.0, 2.0], start=1):
        assert guard.check(step, loss, 1.0, regime=1)
    assert not guard.check(4, 6.5, 1.0, regime=1)  # > 3 x 2.0
    assert guard.check(5, 2.1, 1.0, regime=1)  # a healthy step ends the streak
    assert not guard.check(6, 2.0, 20.0, regime=1)  # gradient norm > 10 x 1.0
    assert guard.check(7, 9.0, 1.0, regime=2)  # a new block size: the averages start afresh
    restored = SpikeGuard(loss_factor=3.0, grad_factor=10.0, window=3, max_consecutive=2)
    restored.load_state(json.loads(json.dumps(guard.state())))
    assert restored.state() == guard.state()
    for step in (8, 9):
        assert restored.check(step, 9.0, 1.0, regime=2)
    assert not restored.check(10, 30.0, 1.0, regime=2)
    with pytest.raises(TrainingHalted, match=r"loss \(40\) was above 3 x .* 2 steps in a row"):
        restored.check(11, 40.0, 1.0, regime=2)


def test_healthy_checkpoint_is_the_one_whose_next_step_was_healthy() -> None:
    h = HealthyCheckpoints()
    h.started_from(4)
    h.step_done(5, healthy=True)
    h.saved_at(5)
    assert h.protected() == {4}
    h.step_done(6, healthy=False)  # the weights of checkpoint 5 gave an anomalous step
    h.saved_at(6)
    assert h.protected() == {4} and h.suspect() == [5, 6]


def test_level_shift_guard_halts_on_a_lasting_rise_only() -> None:
    guard = LevelShiftGuard(factor=1.3, window=4)
    losses = [5.0, 5.2, 4.8, 5.0, 5.4, 4.6, 5.1, 4.9]  # noise around a level: no halt
    for step, loss in enumerate(losses, start=1):
        guard.check(step, loss, regime=1)
    guard.check(9, 9.0, regime=2)  # a new block size moves the loss: a new level
    for step in range(10, 14):
        guard.check(step, 9.0, regime=2)
    restored = LevelShiftGuard(factor=1.3, window=4)
    restored.load_state(json.loads(json.dumps(guard.state())))
    assert restored.best == 9.0 and restored.state()["factor"] == 1.3
    restored.check(14, 12.5, regime=2)  # one high step moves the mean by 9%
    with pytest.raises(LevelShift, match=r"mean over the last 4 steps .* x its earlier level"):
        for step in range(15, 19):
            restored.check(step, 12.5, regime=2)
    off = LevelShiftGuard(factor=0, window=4)
    for step, loss in enumerate([1.0] * 4 + [50.0] * 8, start=1):
        off.check(step, loss)


def test_checkpoints_are_trusted_against_level_shifts_after_the_window() -> None:
    h = HealthyCheckpoints(confirm_after=4)
    h.started_from(10)  # written by an earlier start: kept until a newer one is trusted
    assert h.protected() == {10}
    for step in range(11, 13):
        h.step_done(step, healthy=True)
    h.saved_at(12)
    h.step_done(13, healthy=True)  # 12 is spike-healthy, not yet trusted against a level shift
    assert h.healthy == 12 and h.confirmed is None and h.protected() == {10, 12}
    assert h.last_good(level_shift=True) == 10 and h.suspect(level_shift=True) == [12]
    h.step_done(14, healthy=True)  # 10 + 4 steps passed the level check
    assert h.confirmed == 10
    for step in range(15, 17):
        h.step_done(step, healthy=True)
    assert h.confirmed == 12 and h.protected() == {12}
    assert 10 not in h.suspect() and 10 not in h.suspect(level_shift=True)


def test_a_loss_spike_halts_and_keeps_the_last_healthy_checkpoint(
    corpus_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBDIFF_FAULT_SPIKE_STEPS", "5,6")
    save = tmp_path / "run"
    with pytest.raises(TrainingHalted) as info:
        train_in_process(
            corpus_prefix,
            "--train.steps=10",
            f"--checkpoint.save={save}",
            "--checkpoint.save_interval=1",
            "--checkpoint.keep_last=1",
            "--faults.spike_window=2",
            "--faults.max_consecutive_spikes=2",
        )
    message = str(info.value)
    assert "up to step 6" in message and str(save / "iter_0000003") in message, message
    assert "nbdiff train" in message
    # keep_last=1 kept the newest (5, set aside) AND the healthy 3; `latest` points back at 3.
    assert [s for s, _ in checkpointing.list_checkpoints(save)] == [3]
    assert (save / "latest").read_text().strip() == "3"
    assert sorted(p.name for p in (save / "anomalous").iterdir()) == ["iter_0000005"]
    assert not (save / "COMPLETE").exists()


def test_completion_marker_and_idempotent_relaunch(corpus_prefix: str, tmp_path: Path) -> None:
    save = tmp_path / "run"
    first = train_in_process(corpus_prefix, "--train.steps=3", f"--checkpoint.save={save}")
    marker = json.loads((save / "COMPLETE").read_text())
    assert marker["step"] == 3 and marker["checkpoint"] == first.checkpoint
    again = train_in_process(corpus_prefix, "--train.steps=3", f"--checkpoint.save={save}")
    assert again.already_complete and again.history == [] and again.final_step == 3
    longer = train_in_process(
        corpus_prefix, "--train.steps=5", f"--checkpoint.save={save}", f"--checkpoint.load={save}"
    )
    assert [r["step"] for r in longer.history] == [4, 5]
    assert json.loads((save / "COMPLETE").read_text())["step"] == 5
    starts = [json.loads(line) for line in (save / "runs.jsonl").read_text().splitlines()]
    assert [s["start_step"] for s in starts] == [0, 3] and all(s["host"] for s in starts)


def test_ctrl_c_saves_and_exits_like_sigterm(corpus_prefix: str, tmp_path: Path) -> None:
    save = tmp_path / "run"
    launched = Launched(
        cli_command(corpus_prefix, "--train.steps=500", f"--checkpoint.save={save}"),
        tmp_path / "run.log",
    )
    try:
        assert wait_for(lambda: len(read_metrics(save / "metrics.jsonl")) >= 2), launched.output()
        os.kill(launched.proc.pid, signal.SIGINT)
        code = launched.proc.wait(timeout=120)
    finally:
        launched.cleanup()
    out = launched.output()
    assert code == 0 and "Traceback" not in out, out
    assert "Ctrl-C" in out and "received SIGINT" in out and "resume with the same command" in out
    last = read_metrics(save / "metrics.jsonl")[-1]["step"]
    assert checkpointing.list_checkpoints(save)[-1][0] == last < 500
    assert not (save / "COMPLETE").exists()


def test_a_signal_recorded_before_the_handler_is_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "signal"
    path.write_text("SIGUSR1")
    monkeypatch.setenv("NBDIFF_SIGNAL_FILE", str(path))
    handler = PreemptionHandler().install()
    try:
        assert handler.poll() == "SIGUSR1"
    finally:
        handler.uninstall()


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler installed for `sig` (SigCgt in /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) >> (int(sig) - 1) & 1)


def _supervised(corpus_prefix: str, save: Path) -> list[str]:
    args = ["-m", "nbdiff_megatron.cli", "train", "--config", str(REPO / "examples/tiny_cpu.yaml")]
    args += tiny_overrides(corpus_prefix, "--train.steps=200", f"--checkpoint.save={save}")
    return [sys.executable, "-m", "nbdiff_megatron.training.cluster", *torchrun_command(args)]


@pytest.mark.multirank
def test_supervised_torchrun_stops_cleanly_on_an_early_usr1(
    corpus_prefix: str, tmp_path: Path
) -> None:
    """USR1 sent to the supervisor before the trainers listen: torchrun survives, every rank saves
    after its first step and the whole tree exits 0 (the batch script then requeues the job)."""
    save = tmp_path / "run"
    launched = Launched(_supervised(corpus_prefix, save), tmp_path / "run.log")
    try:
        # As soon as the supervisor handles USR1 (a fixed sleep let a loaded machine kill it first):
        # torchrun is starting, the trainers are still importing torch.
        assert wait_for(lambda: _catches(launched.proc.pid, signal.SIGUSR1), timeout=120)
        os.kill(launched.proc.pid, signal.SIGUSR1)
        code = launched.proc.wait(timeout=240)
    finally:
        launched.cleanup()
    out = launched.output()
    assert code == 0, out
    assert "received SIGUSR1" in out and "SignalException" not in out, out
    steps = [r["step"] for r in read_metrics(save / "metrics.jsonl")]
    assert steps and steps[-1] < 200 and checkpointing.list_checkpoints(save)[-1][0] == steps[-1]


@pytest.mark.multirank
def test_supervised_torchrun_survives_sigterm_to_every_process(
    corpus_prefix: str, tmp_path: Path
) -> None:
    """SLURM's SIGTERM reaches every process of the step, torchrun included: it must not raise."""
    save = tmp_path / "run"
    launched = Launched(_supervised(corpus_prefix, save), tmp_path / "run.log")
    try:
        assert wait_for(lambda: len(read_metrics(save / "metrics.jsonl")) >= 2, timeout=180), (
            launched.output()
        )
        tree = [
            launched.proc.pid,
            *(p.pid for p in psutil.Process(launched.proc.pid).children(True)),
        ]
        for pid in tree:
            os.kill(pid, signal.SIGTERM)
        code = launched.proc.wait(timeout=120)
    finally:
        launched.cleanup()
    out = launched.output()
    assert code == 0 and "SignalException" not in out and "received SIGTERM" in out, out


def test_kill_9_mid_save_leaves_no_process_and_the_pipe_ends(
    corpus_prefix: str, tmp_path: Path
) -> None:
    save = tmp_path / "run"
    cmd = cli_command(corpus_prefix, "--train.steps=5", f"--checkpoint.save={save}")
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=clean_env({"NBDIFF_FAULT_KILL_IN_WRITE": "5", "PYTHONUNBUFFERED": "1"}),
        start_new_session=True,
    )
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=180)
        if code == 0:
            # The drill fires when the save forks; a megatron-core whose save forks no writer
            # process (0.19.x saves in-process here) has nothing to orphan.
            reader.join(timeout=10)
            assert not reader.is_alive() and b"step 5/5" in chunks[0], chunks[:1]
            import megatron.core

            pytest.skip(
                f"megatron-core {megatron.core.__version__} forks no checkpoint writer process: "
                "nothing can be orphaned"
            )
        assert code == -signal.SIGKILL
        # The trainer is dead: its stalled writer workers must die with it and release the pipe.
        reader.join(timeout=10)
        assert not reader.is_alive(), "the pipe stayed open after the trainer died (orphans)"
        out = chunks[0]
        assert b"step 5/5" in out, out[-3000:]
        leftovers = [
            p
            for p in psutil.process_iter(["cmdline"])
            if str(save) in " ".join(p.info["cmdline"] or [])
        ]
        assert leftovers == [], leftovers
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert checkpointing.list_checkpoints(save) == [] and not (save / "COMPLETE").exists()


def test_wandb_without_the_package_is_one_clear_error(
    corpus_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbdiff_megatron.errors import ConfigError

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match=r"logging.wandb_project='p' needs .* pip install wandb"):
        train_in_process(
            corpus_prefix,
            "--train.steps=1",
            f"--checkpoint.save={tmp_path / 'run'}",
            "--logging.wandb_project=p",
        )


def test_wandb_offline_logs_steps_and_the_job(
    corpus_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[01-02]")
    save = tmp_path / "run"
    train_in_process(
        corpus_prefix,
        "--train.steps=2",
        f"--checkpoint.save={save}",
        "--logging.wandb_project=nbdiff-test",
        "--logging.wandb_mode=offline",
    )
    runs = list((save / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), runs
    start = json.loads((save / "runs.jsonl").read_text().splitlines()[0])
    assert start["job_id"] == "4242" and start["nodes"] == "node[01-02]"
