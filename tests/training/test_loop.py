"""The training loop in one process: it learns, it is AR training at B = 1 and λ = 1, faults."""

from __future__ import annotations

import gc
import math
import os
from pathlib import Path

import pytest
import torch

from nbdiff_megatron.errors import CheckpointError
from nbdiff_megatron.training import checkpointing
from nbdiff_megatron.training.faults import NonFiniteGuard, PreemptionHandler, TrainingHalted
from nbdiff_megatron.training.logging import read_metrics

from .runs import TINY, plain_causal_loss, tiny_overrides, train_in_process


def test_single_rank_trains_saves_and_keeps_the_last_k(corpus_prefix: str, tmp_path: Path) -> None:
    save = tmp_path / "run"
    result = train_in_process(
        corpus_prefix,
        "--train.steps=10",
        "--curriculum.start_block_size=1",
        "--curriculum.target_block_size=4",
        "--curriculum.growth_warmup=4",
        "--curriculum.growth_interval=3",
        f"--checkpoint.save={save}",
        "--checkpoint.save_interval=3",
        "--checkpoint.keep_last=2",
    )
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    # One meaning of "step k" (issue 11): B = 2 first trains at step warmup + interval = 7 and
    # B = 4 at step 10, the steps eq. 3 names; the logged LR is that of step k too.
    assert [r["block_size"] for r in result.history] == [1, 1, 1, 1, 1, 1, 2, 2, 2, 4]
    from nbdiff_megatron.training.config import load_config

    cfg = load_config(
        TINY,
        tiny_overrides(
            corpus_prefix,
            "--train.steps=10",
            "--curriculum.target_block_size=4",
            "--curriculum.growth_warmup=4",
            "--curriculum.growth_interval=3",
        ),
    )
    schedule = cfg.step_schedule()
    assert schedule.curriculum.growth_end_step() == 10 and schedule.block_size(10) == 4
    assert [r["lr"] for r in result.history] == pytest.approx(
        [schedule.lr(k) for k in range(1, 11)]
    )
    # B = 1 steps: the AR term only (token shift leaves nothing to mask); it must go down.
    assert losses[5] < losses[0] - 0.3
    ar = [r["ar"] for r in result.history]
    assert ar[-1] < ar[0] - 0.5
    assert all(r["mdm"] > 0 for r in result.history[7:])
    # Checkpoints at 3, 6, 9 and the end (10); only the newest two are kept.
    assert [s for s, _ in checkpointing.list_checkpoints(save)] == [9, 10]
    assert (save / "latest").read_text().strip() == "10"
    assert not list(save.glob(".tmp_*"))
    assert (save / "config.yaml").is_file()
    assert [r["step"] for r in read_metrics(save / "metrics.jsonl")] == list(range(1, 11))
    assert any((save / "tensorboard").iterdir())


def test_block_size_one_and_ar_weight_one_is_plain_causal_lm_training(corpus_prefix: str) -> None:
    extra = [
        "--train.steps=2",
        "--curriculum.start_block_size=1",
        "--curriculum.target_block_size=1",
        "--curriculum.ar_weight=1.0",
    ]
    result = train_in_process(corpus_prefix, *extra)
    assert all(r["mdm"] == 0.0 and r["block_size"] == 1 for r in result.history)
    # The same initial weights and the same first batch, through a plain causal forward on x_0 only.
    plain = plain_causal_loss(corpus_prefix, *extra)
    assert result.history[0]["loss"] == pytest.approx(plain, abs=1e-5)
    assert result.history[0]["ar"] == pytest.approx(plain, abs=1e-5)


def test_nonfinite_steps_are_skipped_then_the_run_halts(
    corpus_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBDIFF_FAULT_NAN_STEPS", "2,3")
    result = train_in_process(
        corpus_prefix, "--train.steps=5", "--faults.max_consecutive_nonfinite=3"
    )
    skipped = [r["step"] for r in result.history if r["skipped"]]
    assert skipped == [2, 3] and result.skipped_steps == 2
    assert all(math.isfinite(r["loss"]) for r in result.history if not r["skipped"])
    monkeypatch.setenv("NBDIFF_FAULT_NAN_STEPS", "2,3,4")
    with pytest.raises(TrainingHalted, match=r"not finite\) for 3 steps in a row, up to step 4"):
        train_in_process(corpus_prefix, "--train.steps=6", "--faults.max_consecutive_nonfinite=3")


def _checkpoint_tensors(path: Path, out: Path) -> dict[str, torch.Tensor]:
    """Model weights and optimizer moments of a torch_dist checkpoint, read without megatron."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(path), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_a_nan_gradient_under_a_finite_loss_is_never_applied(
    corpus_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBDIFF_FAULT_NAN_GRAD_STEPS", "2")
    save = tmp_path / "run"
    result = train_in_process(
        corpus_prefix,
        "--train.steps=3",
        f"--checkpoint.save={save}",
        "--checkpoint.save_interval=1",
        "--checkpoint.keep_last=3",
    )
    step2 = result.history[1]
    assert math.isfinite(step2["loss"]) and step2["grad_norm_raw"] == "nan"
    assert step2["skipped"] and result.skipped_steps == 1
    assert not result.history[0]["skipped"] and not result.history[2]["skipped"]
    after1 = _checkpoint_tensors(save / "iter_0000001", tmp_path / "1.pt")
    after2 = _checkpoint_tensors(save / "iter_0000002", tmp_path / "2.pt")
    after3 = _checkpoint_tensors(save / "iter_0000003", tmp_path / "3.pt")
    # Adam moments are in the checkpoint (per parameter, or per gradient bucket for the distributed
    # optimizer's shards).
    assert any(k.startswith("optimizer.") and "exp_avg" in k for k in after2)
    # Weights and Adam moments untouched by step 2; step 3 trains again (and they all stay finite).
    assert after1.keys() == after2.keys()
    for key, value in after1.items():
        assert torch.equal(value, after2[key]), key
    assert not torch.equal(
        after3["embedding.word_embeddings.weight"], after2["embedding.word_embeddings.weight"]
    )
    assert all(bool(torch.isfinite(v).all()) for v in after3.values() if v.is_floating_point())


def test_nonfinite_guard_counts_consecutive_steps() -> None:
    guard = NonFiniteGuard(2)
    assert guard.check(1, 1.0) and not guard.check(2, float("inf"))
    assert guard.check(3, 0.5)  # a finite step resets the streak
    assert not guard.check(4, float("nan"))
    with pytest.raises(TrainingHalted):
        guard.check(5, float("nan"))
    assert guard.total_skipped == 3


def test_preemption_signals_set_the_flag() -> None:
    import os
    import signal

    for name in ("SIGTERM", "SIGUSR1"):
        handler = PreemptionHandler().install()
        try:
            os.kill(os.getpid(), getattr(signal, name))
            assert handler.received == name
        finally:
            handler.uninstall()


def test_missing_or_corrupt_checkpoint_is_one_clear_error(
    corpus_prefix: str, tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        train_in_process(corpus_prefix, "--train.steps=1", f"--checkpoint.load={tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        train_in_process(
            corpus_prefix, "--train.steps=1", f"--checkpoint.load={tmp_path / 'empty'}"
        )
    save = tmp_path / "run"
    train_in_process(corpus_prefix, "--train.steps=1", f"--checkpoint.save={save}")
    ckpt = save / "iter_0000001"
    shards = sorted(ckpt.glob("*.distcp"))
    assert shards
    for shard in shards:  # garbage where the tensors were
        shard.write_bytes(b"\0garbage" * 16)
    # 0.16.1 keeps the common state apart (the tensors fail to load); 0.19.x reads it from the
    # same damaged files, where the shared common-state reader names the damaged shard (the shards
    # are shorter than the index says). Either way: one CheckpointError naming the checkpoint.
    corrupt = (
        r"(cannot load checkpoint|cannot read the common state of checkpoint) .*iter_0000001"
        r"|checkpoint file \S*iter_0000001\S* is truncated"
    )
    with pytest.raises(CheckpointError, match=corrupt):
        train_in_process(corpus_prefix, "--train.steps=2", f"--checkpoint.load={save}")
    (ckpt / "metadata.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        train_in_process(corpus_prefix, "--train.steps=2", f"--checkpoint.load={ckpt}")


def test_a_finished_run_frees_its_model_optimizer_and_process_group_threads(
    corpus_prefix: str,
) -> None:
    """Training twice in one process (`nbdiff ablate`, the demo, a notebook) keeps nothing of the first
    run: megatron-core's DDP hooks used to hold model, optimizer and process groups through autograd's
    C++ nodes, out of the garbage collector's sight (~50 gloo threads a run, waking all the time)."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer

    def alive() -> tuple[int, int]:
        gc.collect()
        objects = gc.get_objects()
        return (
            sum(isinstance(o, DistributedDataParallel) for o in objects),
            sum(isinstance(o, MegatronOptimizer) for o in objects),
        )

    def threads() -> int:
        return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 0

    train_in_process(corpus_prefix, "--train.steps=1", "--parallel.distributed_optimizer=true")
    threads_before = threads()  # train_in_process ends with destroy_parallel, which collects
    before = alive()
    for _ in range(2):
        train_in_process(corpus_prefix, "--train.steps=1", "--parallel.distributed_optimizer=true")
    assert threads() <= threads_before
    assert alive() == before
