"""checkpoint.async_save (issue 22 §2): a checkpoint becomes `latest` only once its background writes are
done; kill -9 during a background write leaves the previous one, whose resume is bitwise identical;
SIGTERM waits for the save in flight. (The synchronous saves run the same finalisation: test_resume.py.)
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from nbdiff_megatron.training import checkpointing
from nbdiff_megatron.training.logging import read_metrics

from .runs import Launched, cli_command, run_cli, train_in_process, wait_for

ASYNC = "--checkpoint.async_save=true"
# B grows during the run (1, 2, 4 from steps 1, 3, 5): noise and masks change across the kill.
RUN = [
    "--train.steps=6",
    "--curriculum.target_block_size=4",
    "--curriculum.growth_warmup=2",
    "--curriculum.growth_interval=2",
    "--checkpoint.save_interval=2",
    "--checkpoint.keep_last=3",
    "--model.hidden_dropout=0.1",
    ASYNC,
]
KEYS = ("step", "loss", "mdm", "ar", "grad_norm", "block_size", "lr", "skipped")


def _curve(records: list[dict]) -> list[tuple]:
    return [tuple(r[k] for k in KEYS) for r in records]


def test_kill_9_during_a_background_write_keeps_the_previous_latest_and_resumes_bitwise(
    corpus_prefix: str, tmp_path: Path
) -> None:
    reference = train_in_process(corpus_prefix, *RUN, f"--checkpoint.save={tmp_path / 'ref'}")
    assert [s for s, _ in checkpointing.list_checkpoints(tmp_path / "ref")] == [2, 4, 6]
    save = tmp_path / "run"
    # The trainer dies right after forking the writer of step 4's checkpoint (its writes stall).
    run_cli(
        corpus_prefix,
        *RUN,
        f"--checkpoint.save={save}",
        log=tmp_path / "killed.log",
        env={"NBDIFF_FAULT_KILL_IN_WRITE": "4"},
        expect=-signal.SIGKILL,
    )
    assert (save / ".tmp_iter_0000004").is_dir()  # the background write, never finalised
    assert not (save / "iter_0000004").exists()
    assert (save / "latest").read_text().strip() == "2"
    resumed = train_in_process(corpus_prefix, *RUN, f"--checkpoint.save={save}")
    assert [r["step"] for r in resumed.history] == [3, 4, 5, 6]
    assert _curve(resumed.history) == _curve(reference.history[2:])  # bitwise, dropout included
    assert not list(save.glob(".tmp_iter_*"))
    assert [s for s, _ in checkpointing.list_checkpoints(save)][-1] == 6


def test_sigterm_waits_for_the_background_save_before_exiting(
    corpus_prefix: str, tmp_path: Path
) -> None:
    save = tmp_path / "run"
    launched = Launched(
        cli_command(
            corpus_prefix,
            "--train.steps=500",
            "--checkpoint.save_interval=1",  # a background save after every step
            "--checkpoint.keep_last=2",
            ASYNC,
            f"--checkpoint.save={save}",
        ),
        tmp_path / "run.log",
    )
    try:
        # The timeout covers the start-up (imports) on a loaded 2-core machine, not the steps.
        assert wait_for(lambda: len(read_metrics(save / "metrics.jsonl")) >= 3, timeout=300), (
            launched.output()
        )
        os.kill(launched.proc.pid, signal.SIGTERM)
        code = launched.proc.wait(timeout=120)
    finally:
        launched.cleanup()
    out = launched.output()
    assert code == 0, out
    last = read_metrics(save / "metrics.jsonl")[-1]["step"]
    final = save / checkpointing.checkpoint_name(last)
    # The checkpoint of the last step was finalised before the exit message, and is `latest`.
    assert out.index(f"checkpoint {final} written in the background") < out.index(
        "received SIGTERM"
    ), out
    assert (save / "latest").read_text().strip() == str(last)
    assert checkpointing.find_checkpoint(save) == final
    assert not list(save.glob(".tmp_iter_*"))
    assert len(checkpointing.list_checkpoints(save)) == 2  # rotation ran in the finalisation
