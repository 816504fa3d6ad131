"""Health halts around a resume (issue 23 §4, §5): a lasting rise of the loss halts the run, the
checkpoint the run resumed from is kept whatever happens after it, and the halt message names it with
the command to continue, never advising deletion.

One healthy run (20 steps, checkpoints iter_10 and iter_20, the level watch's state saved with them) is
made once per module; each test continues a copy of it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nbdiff_megatron.training import checkpointing
from nbdiff_megatron.training.faults import LevelShift, TrainingHalted

from .runs import train_in_process

WATCH = ["--faults.level_window=5", "--checkpoint.save_interval=10", "--checkpoint.keep_last=1"]


@pytest.fixture(scope="module")
def healthy_run(corpus_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    save = tmp_path_factory.mktemp("health") / "run"
    result = train_in_process(
        corpus_prefix, *WATCH, "--train.steps=20", f"--checkpoint.save={save}"
    )
    assert result.final_step == 20
    return save


@pytest.fixture
def run_copy(healthy_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(healthy_run, copy)
    return copy


def _assert_resumed_checkpoint_kept(save: Path, message: str) -> None:
    resumed = save / "iter_0000020"
    assert f"resumed from {resumed}" in message, message
    assert "nbdiff train" in message or "the same nbdiff train command" in message
    assert "delete" not in message
    assert resumed.is_dir() and (save / "latest").read_text().strip() == "20"
    assert checkpointing.list_checkpoints(save)[-1][0] == 20  # the newer ones were set aside


def test_a_high_learning_rate_after_a_resume_halts_on_the_level_shift(
    corpus_prefix: str, run_copy: Path
) -> None:
    """The issue's case: continuing a healthy run with a far too high LR. Only the first step or
    two are spikes; the loss then stays well above its level, which the spike averages absorb."""
    with pytest.raises(LevelShift) as caught:
        train_in_process(
            corpus_prefix,
            *WATCH,
            "--train.steps=60",
            "--optimizer.lr=0.1",
            "--checkpoint.save_interval=2",  # rotation runs during the shift (keep_last=1)
            f"--checkpoint.save={run_copy}",
        )
    message = str(caught.value)
    assert "x its earlier level" in message
    _assert_resumed_checkpoint_kept(run_copy, message)
    assert list((run_copy / checkpointing.ANOMALOUS_DIR).iterdir())  # kept for a look


def test_a_halt_right_after_a_resume_keeps_and_names_the_checkpoint_it_resumed_from(
    corpus_prefix: str, run_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBDIFF_FAULT_NAN_STEPS", "21,22")
    with pytest.raises(TrainingHalted) as caught:
        train_in_process(
            corpus_prefix,
            *WATCH,
            "--train.steps=30",
            "--faults.max_consecutive_nonfinite=2",
            f"--checkpoint.save={run_copy}",
        )
    _assert_resumed_checkpoint_kept(run_copy, str(caught.value))
