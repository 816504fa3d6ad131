"""Exact resumption after a crash, after a crash during a checkpoint write, and after SIGTERM."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from nbdiff_megatron.training import checkpointing
from nbdiff_megatron.training.logging import read_metrics

from .runs import Launched, cli_command, run_cli, train_in_process, wait_for

# B grows during the run (1, 2, 4 from steps 1, 3, 5), so noise and masks change across the kill.
RUN = [
    "--train.steps=8",
    "--curriculum.target_block_size=4",
    "--curriculum.growth_warmup=2",
    "--curriculum.growth_interval=2",
    "--checkpoint.save_interval=3",
    "--model.hidden_dropout=0.1",
]
KEYS = ("step", "loss", "mdm", "ar", "grad_norm", "block_size", "lr", "skipped")


def _curve(records: list[dict]) -> list[tuple]:
    return [tuple(r[k] for k in KEYS) for r in records]


def test_rerunning_the_same_command_after_sigkill_gives_the_same_curve(
    corpus_prefix: str, tmp_path: Path
) -> None:
    reference = train_in_process(corpus_prefix, *RUN, f"--checkpoint.save={tmp_path / 'ref'}")
    save = tmp_path / "run"
    killed = run_cli(
        corpus_prefix,
        *RUN,
        f"--checkpoint.save={save}",
        log=tmp_path / "killed.log",
        env={"NBDIFF_FAULT_KILL_AFTER_STEP": "5"},
        expect=-signal.SIGKILL,
    )
    assert killed.code == -signal.SIGKILL
    assert [r["step"] for r in read_metrics(save / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert [s for s, _ in checkpointing.list_checkpoints(save)] == [3]
    # The very same command (no --checkpoint.load) continues the run: resume rule 1.
    resumed = train_in_process(corpus_prefix, *RUN, f"--checkpoint.save={save}")
    assert [r["step"] for r in resumed.history] == [4, 5, 6, 7, 8]
    # Bit-identical on CPU in fp32: weights, optimizer, data position, dropout RNG and noise all resume.
    assert _curve(read_metrics(save / "metrics.jsonl")) == _curve(reference.history)


def test_a_resumed_run_replays_the_data_and_the_noise(
    corpus_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(step, first sample of the micro-batch) -> its tokens and noise, across a resume."""
    from nbdiff_megatron.training import batches

    seen: dict[tuple, tuple] = {}
    draw = batches.noise_micro_batch

    def recording(cfg, x0, doc_ids, loss_mask, **where):
        noise = draw(cfg, x0, doc_ids, loss_mask, **where)
        key = (where["step"], where["first_sample"])
        seen[key] = (x0.clone(), noise.masked.clone(), noise.t.clone())
        return noise

    monkeypatch.setattr(batches, "noise_micro_batch", recording)
    save = tmp_path / "run"
    train_in_process(corpus_prefix, *RUN[1:], "--train.steps=5", f"--checkpoint.save={save}")
    uninterrupted, seen = seen, {}
    resumed = train_in_process(
        corpus_prefix, *RUN[1:], "--train.steps=5", f"--checkpoint.load={save / 'iter_0000003'}"
    )
    assert [r["step"] for r in resumed.history] == [4, 5]
    # Keys are the steps k as logged (issue 11: one meaning of "step k", noise seed included).
    assert sorted(seen) == [(4, 0), (4, 4), (5, 0), (5, 4)]
    for key, (x0, masked, t) in seen.items():
        ref_x0, ref_masked, ref_t = uninterrupted[key]
        assert torch.equal(x0, ref_x0) and torch.equal(masked, ref_masked), key
        assert torch.equal(t, ref_t), key
    assert any(masked.any() for _, masked, _ in seen.values())  # B = 4 there: real noise


def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(
    corpus_prefix: str, tmp_path: Path
) -> None:
    save = tmp_path / "run"
    run_cli(
        corpus_prefix,
        *RUN,
        f"--checkpoint.save={save}",
        log=tmp_path / "killed.log",
        env={"NBDIFF_FAULT_KILL_IN_SAVE": "6"},
        expect=-signal.SIGKILL,
    )
    assert (save / ".tmp_iter_0000006").is_dir()  # the interrupted write, never renamed
    assert not (save / "iter_0000006").exists()
    assert (save / "latest").read_text().strip() == "3"
    assert checkpointing.find_checkpoint(save) == save / "iter_0000003"
    resumed = train_in_process(
        corpus_prefix, *RUN, f"--checkpoint.save={save}", f"--checkpoint.load={save}"
    )
    assert resumed.history[0]["step"] == 4 and resumed.final_step == 8
    assert not (save / ".tmp_iter_0000006").exists()  # the re-save of step 6 replaced it
    assert [s for s, _ in checkpointing.list_checkpoints(save)][-1] == 8


def test_sigterm_saves_a_checkpoint_and_exits_zero(corpus_prefix: str, tmp_path: Path) -> None:
    save = tmp_path / "run"
    launched = Launched(
        cli_command(
            corpus_prefix,
            "--train.steps=500",
            "--checkpoint.save_interval=1000",
            f"--checkpoint.save={save}",
        ),
        tmp_path / "run.log",
    )
    try:
        assert wait_for(lambda: len(read_metrics(save / "metrics.jsonl")) >= 2, timeout=120), (
            launched.output()
        )
        os.kill(launched.proc.pid, signal.SIGTERM)
        code = launched.proc.wait(timeout=120)
    finally:
        launched.cleanup()
    out = launched.output()
    assert code == 0, out
    assert "received SIGTERM" in out
    steps = [r["step"] for r in read_metrics(save / "metrics.jsonl")]
    assert steps[-1] < 500
    assert checkpointing.list_checkpoints(save)[-1][0] == steps[-1]
