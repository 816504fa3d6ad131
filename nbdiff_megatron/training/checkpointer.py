"""The checkpoints of a running training job: how it starts, what it saves, how it stops.

- `lock_save_dir`: rank 0 checks the save location and takes its run lock (training/run_lock.py).
- `load_start`: rank 0 tidies the save directory, every rank plans the start by the one resume rule
  (`checkpointing.plan_start`, docs/resume.md), checks what the checkpoint states about its run
  (training/run_identity.py) and loads it; the outcome is a typed `Start`.
- `Checkpointer`: saves the checkpoint of a step (at once, or handed to the background writer with
  checkpoint.async_save), finalises background saves, writes the completion marker, and turns a
  halt into the error that names the last healthy checkpoint (with the suspect ones set aside).

The file policy under all of them (names, rotation, markers, RNG state, loading) is
training/checkpointing.py; the health watches are training/faults.py.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from nbdiff_megatron.checkpoint.dist import AsyncWriter
from nbdiff_megatron.errors import CheckpointError, ConfigError
from nbdiff_megatron.training import checkpointing, faults, run_lock
from nbdiff_megatron.training.config import TrainConfig
from nbdiff_megatron.training.logging import RunLogger
from nbdiff_megatron.training.run_identity import run_identity
from nbdiff_megatron.training.setup import Components, finish_param_sync


def lock_save_dir(save: str | None) -> tuple[run_lock.RunLock | None, str | None]:
    """Rank 0: check that `save` can hold checkpoints and take its run lock (one writer per save
    directory). A refusal on rank 0 ends the other ranks too (torchrun stops the group)."""
    if not save or os.environ.get("RANK", "0") != "0":
        return None, None
    checkpointing.check_save_location(save)
    return run_lock.acquire(save)


@dataclass(frozen=True)
class Start:
    """Where this start of the run begins."""

    plan: checkpointing.StartPlan
    identity: dict[str, Any]
    """What every checkpoint of this run states about it (training/run_identity.py)."""
    changes: list[str] = field(default_factory=list)
    """What this start changes against the checkpoint it loads (one line each)."""
    step: int = 0
    """The step of the loaded checkpoint (0 for a fresh or a weights-only start)."""
    consumed_samples: int = 0
    """Samples of the data order consumed before this start."""
    loaded: dict[str, Any] = field(default_factory=dict)
    """The train_state of the checkpoint this start loaded (empty for a fresh start)."""
    resumed_from: str | None = None
    """The checkpoint directory this start loaded."""

    @property
    def resumed_step(self) -> int | None:
        """The step whose full state this start continues (None: a fresh or weights-only start)."""
        return self.step if self.plan.mode in ("continue", "resume") else None

    def resumed_own_checkpoint(self, save: str | None) -> bool:
        """True when the checkpoint this start continues is one of `save`'s (this run's)."""
        if self.resumed_step is None or not save or self.resumed_from is None:
            return False
        return Path(self.resumed_from).parent.resolve() == Path(save).resolve()


def load_start(parts: Components, notes: list[str]) -> Start:
    """Plan the start (rank 0 tidies the save directory first; `notes` gets what it did), check the
    checkpoint against this run's config and load it into the model and optimizer."""
    cfg, ck = parts.cfg, parts.cfg.checkpoint
    plan = _prepare_start(cfg, parts.place.rank, notes)
    identity = run_identity(cfg.to_dict(), parts.tokenizer, parts.mask_id)
    changes = checkpointing.check_start(plan, identity, cfg.to_dict())
    if plan.path is None:
        return Start(plan, identity, changes)
    info = checkpointing.load_checkpoint(
        plan.path,
        [parts.model],
        parts.optimizer,
        weights_only=plan.weights_only,
        fully_parallel=ck.fully_parallel_load,
    )
    step = int(info["step"])
    resumed_from = info["loaded_from"]
    if step > cfg.train.steps:
        raise ConfigError(
            f"checkpoint {resumed_from} is at step {step}, past train.steps="
            f"{cfg.train.steps}; raise --train.steps to continue training"
        )
    consumed = int(info.get("consumed_samples", step * cfg.train.global_batch_size))
    return Start(plan, identity, changes, step, consumed, info, resumed_from)


def _prepare_start(cfg: TrainConfig, rank: int, notes: list[str]) -> checkpointing.StartPlan:
    """Rank 0 tidies the save directory (stale saves, an explicit older checkpoint, damaged newest
    ones: `checkpointing.prepare_save_dir`), then every rank plans the start (the resume rule)."""
    ck = cfg.checkpoint
    failure: BaseException | None = None
    if rank == 0:
        try:
            notes.extend(checkpointing.prepare_save_dir(ck.save, ck.load))
        except CheckpointError as exc:
            failure = exc
    if faults.any_rank_true(failure is not None):
        raise failure or CheckpointError(
            f"rank 0 could not prepare checkpoint.save={ck.save} (its log says why)"
        )
    return checkpointing.plan_start(ck.save, ck.load, ck.finetune)


@dataclass
class Checkpointer:
    """Saves the checkpoints of a run (all ranks call every method, at the same points)."""

    parts: Components
    start: Start
    guards: faults.Guards
    """The run's watches: their state is saved, and rotation keeps the last healthy checkpoint."""
    drills: faults.Drills
    job: dict[str, Any]
    """The job's metadata (training/cluster.py), saved with every checkpoint."""
    logger: RunLogger
    writer: AsyncWriter | None = None
    """checkpoint.async_save: the background checkpoint writer."""

    @classmethod
    def build(
        cls,
        parts: Components,
        start: Start,
        guards: faults.Guards,
        drills: faults.Drills,
        job: dict[str, Any],
        logger: RunLogger,
    ) -> Checkpointer:
        ck = parts.cfg.checkpoint
        writer = AsyncWriter() if ck.async_save and ck.save else None
        return cls(parts, start, guards, drills, job, logger, writer)

    @property
    def save_dir(self) -> str | None:
        return self.parts.cfg.checkpoint.save

    def due(self, step: int, preempted: bool) -> bool:
        """Whether `step` saves: every checkpoint.save_interval steps, the last step and a stop by
        a signal (always, when checkpoint.save is set)."""
        ck = self.parts.cfg.checkpoint
        done = step == self.parts.cfg.train.steps
        return bool(ck.save) and (step % ck.save_interval == 0 or done or preempted)

    def save(self, step: int) -> Path:
        """Save the checkpoint of `step`: at once, or with checkpoint.async_save handed to the
        background writer (after the previous background save was finalised: one in flight)."""
        t0 = time.perf_counter()
        parts, cfg = self.parts, self.parts.cfg
        finish_param_sync(parts.model)
        self.finish()

        def complete(path: Path) -> None:
            how = "written in the background" if self.writer is not None else "saved"
            self.logger.info(f"checkpoint {path} {how} ({time.perf_counter() - t0:.1f} s)")

        path = checkpointing.save_checkpoint(
            cfg.checkpoint.save,
            step,
            [parts.model],
            parts.optimizer,
            self._train_state(step),
            keep_last=cfg.checkpoint.keep_last,
            # Asked when the checkpoint is finalised (later, with async_save).
            protect=self.guards.healthy.protected,
            optimizer_sharding=cfg.checkpoint.optimizer_sharding,
            writer=self.writer,
            on_complete=complete,
            fully_parallel=cfg.checkpoint.fully_parallel_save,
            drills=self.drills,
        )
        self.guards.healthy.saved_at(step)
        if self.writer is not None:
            self.logger.info(
                f"checkpoint of step {step} handed to the background writer "
                f"({time.perf_counter() - t0:.1f} s of training time)"
            )
        return path

    def _train_state(self, step: int) -> dict[str, Any]:
        """The picklable state of the run saved beside the weights and the optimizer."""
        cfg, start = self.parts.cfg, self.start
        return {
            "config": cfg.to_dict(),
            "consumed_samples": start.consumed_samples
            + (step - start.step) * cfg.train.global_batch_size,
            "tokenizer": {"type": cfg.data.tokenizer_type, "model": cfg.data.tokenizer_model},
            "job": self.job,
            "health": self.guards.health.state(),
            "run": self.start.identity,
            # blocks count from each packed document's start (docs/METHOD.md §3): decoders align so
            "block_align": "document",
        }

    def poll(self) -> None:
        """Finalise a background save whose writes are done (no wait)."""
        if self.writer is not None:
            self.writer.finalize(wait=False)

    def finish(self) -> None:
        """Wait for the background save in flight (checkpoint.async_save) and finalise it: before
        the run ends, exits on a signal or sets checkpoints aside."""
        if self.writer is not None:
            self.writer.finalize(wait=True)

    def mark_complete(self, final_step: int, checkpoint: str | None) -> None:
        """Write the COMPLETE marker of a run that reached train.steps (resume rule 4)."""
        if self.parts.place.rank == 0:
            checkpointing.write_completion_marker(
                self.save_dir, final_step, {"checkpoint": checkpoint, "job": self.job}
            )
        if dist.is_initialized():
            dist.barrier()

    def halt(
        self, exc: faults.TrainingHalted, step: int, command: str | None
    ) -> faults.TrainingHalted:
        """The TrainingHalted to raise: with the suspect checkpoints set aside and `latest` pointing
        at the last good one (never the checkpoint this start resumed from: it is kept), whose path
        and the command to continue from it the message names. Nothing is advised to be deleted."""
        save = self.save_dir
        if not save:
            return exc
        self.finish()
        healthy = self.guards.healthy
        level = isinstance(exc, faults.LevelShift)
        good = healthy.last_good(level_shift=level)
        suspect = healthy.suspect(level_shift=level)
        if self.parts.place.rank == 0:
            checkpointing.set_aside(save, suspect, good)
        if dist.is_initialized():
            dist.barrier()
        return type(exc)(f"{exc} {_where_to_go_on(save, healthy, good, suspect, step, command)}")


def _where_to_go_on(
    save: str,
    healthy: faults.HealthyCheckpoints,
    good: int | None,
    suspect: list[int],
    step: int,
    command: str | None,
) -> str:
    """The part of a halt's message that says which checkpoint to go on from, and how."""
    aside = (
        f"; the {len(suspect)} checkpoint(s) written after it were moved to "
        f"{Path(save) / checkpointing.ANOMALOUS_DIR} (kept for a look)"
        if suspect
        else ""
    )
    rerun = (
        f"{command or 'the same nbdiff train command'} with a lower --optimizer.lr (or after "
        f"checking the data around step {step})"
    )
    if good is None:
        return (
            "No checkpoint of this start was verified healthy (the anomaly began before one was)"
            f"{aside}. Re-run {rerun}: it starts again at step 0 and keeps this run's files"
        )
    path = Path(save) / checkpointing.checkpoint_name(good)
    if good == healthy.resumed and good != healthy.healthy:
        return (
            f"This start resumed from {path} (step {good}, written by an earlier start), which is "
            f"kept and `latest` points at it{aside}. Continue from it with: {rerun}"
        )
    return (
        f"The last healthy checkpoint is {path} (step {good}); `latest` points at it{aside}. "
        f"Resume from it with: {rerun}"
    )
