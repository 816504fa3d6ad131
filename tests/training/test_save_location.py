"""Bad save locations are one clear error before training; a save that fails mid-run keeps the
previous checkpoint (issue 23 §6)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from nbdiff_megatron.errors import CheckpointError
from nbdiff_megatron.training import checkpointing

from .runs import train_in_process


def test_a_file_as_save_location_is_one_clear_error(corpus_prefix: str, tmp_path: Path) -> None:
    path = tmp_path / "runs"
    path.write_text("not a directory\n")
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        train_in_process(corpus_prefix, "--train.steps=1", f"--checkpoint.save={path}")
    with pytest.raises(CheckpointError, match="cannot be written.*Not a directory"):
        train_in_process(corpus_prefix, "--train.steps=1", f"--checkpoint.save={path}/run")
    assert path.read_text() == "not a directory\n"


def test_an_unwritable_save_location_is_one_clear_error(corpus_prefix: str) -> None:
    unwritable = Path("/sys/nbdiff-save-probe")
    if os.access("/sys", os.W_OK) and not os.path.ismount("/sys"):
        pytest.skip("/sys is writable here")
    with pytest.raises(CheckpointError, match="cannot be written"):
        train_in_process(corpus_prefix, "--train.steps=1", f"--checkpoint.save={unwritable}/run")


def test_a_full_disk_is_refused_before_training(
    corpus_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shutil.disk_usage

    def nearly_full(path):
        usage = real(path)
        return usage._replace(free=100_000)  # less than one checkpoint of the tiny model

    monkeypatch.setattr(checkpointing.shutil, "disk_usage", nearly_full)
    save = tmp_path / "run"
    with pytest.raises(CheckpointError, match="GiB free; one checkpoint of this model"):
        train_in_process(corpus_prefix, "--train.steps=1", f"--checkpoint.save={save}")
    assert not list(save.glob("iter_*")) and not (save / "metrics.jsonl").exists()


def test_a_save_that_fails_mid_run_keeps_the_previous_checkpoint(
    corpus_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = checkpointing.write_dist_checkpoint
    calls = []

    def disk_fills_up(state, directory, **kwargs):
        calls.append(directory)
        if len(calls) == 2:
            Path(directory, "__0_0.distcp").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(state, directory, **kwargs)

    monkeypatch.setattr(checkpointing, "write_dist_checkpoint", disk_fills_up)
    save = tmp_path / "run"
    with pytest.raises(CheckpointError) as caught:
        train_in_process(
            corpus_prefix,
            "--train.steps=4",
            "--checkpoint.save_interval=2",
            f"--checkpoint.save={save}",
        )
    message = str(caught.value)
    assert "saving the checkpoint of step 4" in message and "No space left" in message
    assert f"{save / 'iter_0000002'} is kept" in message
    assert [s for s, _ in checkpointing.list_checkpoints(save)] == [2]
    assert (save / "latest").read_text().strip() == "2"
    assert not list(save.glob(".tmp_*"))
