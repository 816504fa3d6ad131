"""The one resume rule (docs/resume.md), trainer side: each case of rules 1-3 and the printed command.

1. A save directory that holds this run's checkpoints is continued, whatever checkpoint.load /
   checkpoint.finetune say (so `--checkpoint.load=<own save dir>` with finetune:true continues too).
2. Otherwise checkpoint.load names another run: finetune loads weights only, else its full state.
3. A new start never overwrites a checkpoint or a metrics.jsonl of an earlier start.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nbdiff_megatron.errors import CheckpointError
from nbdiff_megatron.training import checkpointing
from nbdiff_megatron.training.logging import read_metrics
from tests.launch import REPO, clean_env

from .runs import Launched, cli_command, train_in_process, wait_for

SHORT = ["--checkpoint.save_interval=3", "--curriculum.target_block_size=4"]


def _files(directory: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file under a checkpoint directory: equal means untouched."""
    return {
        str(f.relative_to(directory)): (f.stat().st_ino, f.stat().st_mtime_ns)
        for f in sorted(directory.rglob("*"))
        if f.is_file()
    }


def test_load_of_own_save_dir_with_finetune_continues_fully(
    corpus_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save = tmp_path / "run"
    first = train_in_process(corpus_prefix, *SHORT, "--train.steps=3", f"--checkpoint.save={save}")
    assert first.final_step == 3
    before_ckpt = _files(save / "iter_0000003")
    before_metrics = read_metrics(save / "metrics.jsonl")

    calls = []
    load = checkpointing.load_checkpoint

    def spy(path, model, optimizer, *, weights_only=False, **kwargs):
        calls.append((Path(path), weights_only))
        return load(path, model, optimizer, weights_only=weights_only, **kwargs)

    monkeypatch.setattr(checkpointing, "load_checkpoint", spy)
    # What the README's cluster configs did: finetune: true, and the stopped run's own dir as load.
    again = train_in_process(
        corpus_prefix,
        *SHORT,
        "--train.steps=6",
        f"--checkpoint.save={save}",
        f"--checkpoint.load={save}",
        "--checkpoint.finetune=true",
    )
    assert calls == [(save / "iter_0000003", False)]  # full state, not weights only
    assert [r["step"] for r in again.history] == [4, 5, 6]  # no step-0 restart
    assert _files(save / "iter_0000003") == before_ckpt  # the run's checkpoint is untouched
    metrics = read_metrics(save / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5, 6]
    assert metrics[:3] == before_metrics  # the earlier steps' records are kept as they were
    assert [s for s, _ in checkpointing.list_checkpoints(save)] == [3, 6]


def test_finetune_from_another_run_loads_weights_only(
    corpus_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    previous = tmp_path / "phase1"
    train_in_process(corpus_prefix, *SHORT, "--train.steps=3", f"--checkpoint.save={previous}")
    previous_files = _files(previous)

    calls = []
    load = checkpointing.load_checkpoint

    def spy(path, model, optimizer, *, weights_only=False, **kwargs):
        calls.append((Path(path), weights_only))
        return load(path, model, optimizer, weights_only=weights_only, **kwargs)

    monkeypatch.setattr(checkpointing, "load_checkpoint", spy)
    save = tmp_path / "phase2"
    nxt = train_in_process(
        corpus_prefix,
        *SHORT,
        "--train.steps=2",
        f"--checkpoint.save={save}",
        f"--checkpoint.load={previous}",
        "--checkpoint.finetune=true",
    )
    assert calls == [(previous / "iter_0000003", True)]
    assert [r["step"] for r in nxt.history] == [1, 2]  # the next phase starts at step 0
    assert _files(previous) == previous_files  # the other run is never written to
    assert [s for s, _ in checkpointing.list_checkpoints(save)] == [2]

    # Re-running the same next-phase command now continues it (rule 1), not phase1 again.
    calls.clear()
    cont = train_in_process(
        corpus_prefix,
        *SHORT,
        "--train.steps=4",
        f"--checkpoint.save={save}",
        f"--checkpoint.load={previous}",
        "--checkpoint.finetune=true",
    )
    assert calls == [(save / "iter_0000002", False)]
    assert [r["step"] for r in cont.history] == [3, 4]


def test_load_of_another_run_without_finetune_resumes_its_full_state(
    corpus_prefix: str, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    train_in_process(corpus_prefix, *SHORT, "--train.steps=3", f"--checkpoint.save={other}")
    save = tmp_path / "branch"
    branch = train_in_process(
        corpus_prefix,
        *SHORT,
        "--train.steps=5",
        f"--checkpoint.save={save}",
        f"--checkpoint.load={other}",
    )
    assert [r["step"] for r in branch.history] == [4, 5]
    assert [s for s, _ in checkpointing.list_checkpoints(other)] == [3]
    assert [s for s, _ in checkpointing.list_checkpoints(save)] == [5]


def test_metrics_of_an_earlier_start_without_checkpoint_are_kept(
    corpus_prefix: str, tmp_path: Path
) -> None:
    save = tmp_path / "run"
    save.mkdir()
    earlier = '{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.5}\n'
    (save / "metrics.jsonl").write_text(earlier)
    result = train_in_process(corpus_prefix, *SHORT, "--train.steps=2", f"--checkpoint.save={save}")
    assert [r["step"] for r in result.history] == [1, 2]
    kept = sorted(save.glob("metrics.before-*.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == earlier
    assert [r["step"] for r in read_metrics(save / "metrics.jsonl")] == [1, 2]


def test_plan_start_cases(tmp_path: Path) -> None:
    """The decision alone, on directories without checkpoints (the cheap cases)."""
    save = tmp_path / "run"
    assert checkpointing.plan_start(None, None, False).mode == "fresh"
    # The own, still empty, save dir as load: a first launch of a requeue-safe command starts fresh.
    assert checkpointing.plan_start(str(save), str(save), False).mode == "fresh"
    with pytest.raises(CheckpointError, match="previous phase"):
        checkpointing.plan_start(str(save), str(save), True)  # finetune with nothing to load
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpointing.plan_start(str(save), str(tmp_path / "missing"), True)


def test_the_printed_resume_command_works_as_printed(corpus_prefix: str, tmp_path: Path) -> None:
    save = tmp_path / "run"
    cmd = cli_command(
        corpus_prefix, "--train.steps=60", "--checkpoint.save_interval=1000", f"--save={save}"
    )
    launched = Launched(cmd, tmp_path / "run.log")
    try:
        assert wait_for(lambda: len(read_metrics(save / "metrics.jsonl")) >= 2, timeout=120), (
            launched.output()
        )
        os.kill(launched.proc.pid, signal.SIGTERM)
        assert launched.proc.wait(timeout=120) == 0, launched.output()
    finally:
        launched.cleanup()
    out = launched.output()
    stopped_at = checkpointing.list_checkpoints(save)[-1][0]
    assert stopped_at < 60
    match = re.search(r"resume with the same command \(.*?\): (nbdiff train .*)$", out, re.M)
    assert match, out
    printed = match.group(1)
    # Run it exactly as printed, by a shell, with the environment's `nbdiff` on the PATH.
    env = clean_env({"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"})
    done = subprocess.run(
        printed, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"continuing this run from {save / checkpointing.checkpoint_name(stopped_at)}" in (
        done.stdout
    )
    steps = [r["step"] for r in read_metrics(save / "metrics.jsonl")]
    assert steps == list(range(1, 61))
