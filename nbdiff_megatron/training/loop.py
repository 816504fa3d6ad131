"""The NBDiff training loop on megatron-core: `train()`, a short driver over the run's components.

- training/setup.py builds the parts (process group, tokenizer, model in megatron-core's DDP, its
  optimizer, the dataset) into a typed `Components`;
- training/checkpointer.py plans the start by the one resume rule and loads it (`Start`), and saves,
  finalises and sets aside checkpoints (`Checkpointer`);
- training/step.py runs optimizer step k (`TrainStep`: micro-batches and their noise from
  training/batches.py, forward/backward, reductions, clipping, the update);
- training/faults.py watches every step (`Guards`) and holds the fault drills, read once at the start
  (`Drills`);
- training/reporting.py tells the user (`Reporter`: the start, every step, the summary).

Step k counts from 1 (k = 1..train.steps: B, λ, LR, noise seed, log line and checkpoint iter_k of
step k; `method/curriculum.py` states this convention). A requeued job, a preemption and a crash
continue the same run: the data order, the noise and the RNG states resume exactly.

`train(cfg, objective="ar")` runs the same steps as a plain causal LM instead (the baseline of
benchmarks/train_step.py): the same model, optimizer, precision, DDP and batches, but the forward is
over the L tokens of x_0 with the causal mask, and the loss is L_AR alone (training/step.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from nbdiff_megatron.training import checkpointing, cluster, faults, run_dir
from nbdiff_megatron.training.checkpointer import Checkpointer, Start, load_start, lock_save_dir
from nbdiff_megatron.training.config import TrainConfig
from nbdiff_megatron.training.reporting import Reporter, say_already_complete
from nbdiff_megatron.training.setup import (
    Components,
    build_components,
    check_objective,
    data_iterator,
)
from nbdiff_megatron.training.step import TrainStep


@dataclass
class TrainResult:
    """What `train` returns."""

    final_step: int
    """Optimizer steps completed (including those of the run it resumed)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One record per step run by THIS process (StepRecord fields)."""
    checkpoint: str | None = None
    """The last checkpoint written, if any."""
    stopped_by_signal: str | None = None
    """SIGTERM / SIGUSR1 when the run was preempted (a checkpoint was saved)."""
    skipped_steps: int = 0
    """Steps skipped because the loss or the gradient norm was not finite."""
    num_params: int = 0
    """Parameters of the whole model, counted once (the same at any parallel layout)."""
    already_complete: bool = False
    """The save directory held a COMPLETE marker for train.steps: nothing was run."""


def train(
    cfg: TrainConfig,
    *,
    label: str = "train",
    resume_command: str | None = None,
    objective: str = "nbdiff",
) -> TrainResult:
    """Run (or resume) training as configured; all ranks call it. Returns a TrainResult.

    How the run starts follows the one resume rule (`checkpointing.plan_start`): a save directory
    that holds this run's checkpoints is continued, whatever checkpoint.load / finetune say.
    `resume_command` is the command line that started the run (printed when a signal stops it: the
    same command continues the run). `objective="ar"` trains the same model as a plain causal LM on
    x_0 (module docstring; `check_objective` says what it runs with). Rank 0 holds the save
    directory's run lock (training/run_lock.py) from before anything is written until the end.
    """
    check_objective(cfg, objective)
    lock, lock_note = lock_save_dir(cfg.checkpoint.save)
    try:
        cfg = run_dir.with_absolute_paths(cfg)  # the run's records work from any directory
        marker = checkpointing.read_completion_marker(cfg.checkpoint.save)
        if marker is not None and marker["step"] >= cfg.train.steps:
            # Resume rule 4: a requeued job or a re-run pipeline step of a finished run does nothing.
            say_already_complete(cfg, marker)
            return TrainResult(final_step=marker["step"], already_complete=True)
        drills = faults.Drills.from_env()  # read once: the step and the saves are handed them
        notes = [lock_note] if lock_note else []
        parts = build_components(cfg, objective)
        try:
            start = load_start(parts, notes)
            run = _Run.open(parts, start, drills, label, resume_command)
            run.begin(notes, was_complete=marker is not None)
            return run.train()
        finally:
            parts.release()
    finally:
        if lock is not None:
            lock.release()


@dataclass
class _Run:
    """One start of a run: its components, and the loop over its steps."""

    parts: Components
    start: Start
    step: TrainStep
    guards: faults.Guards
    checkpoints: Checkpointer
    reporter: Reporter
    drills: faults.Drills
    job: dict[str, Any]
    command: str | None

    @classmethod
    def open(
        cls,
        parts: Components,
        start: Start,
        drills: faults.Drills,
        label: str,
        command: str | None,
    ) -> _Run:
        batches = data_iterator(parts.cfg, parts.dataset, parts.place, start.consumed_samples)
        reporter = Reporter.open(parts, start, label)
        job = cluster.job_metadata()
        guards = faults.Guards.from_config(parts.cfg.faults)
        guards.resume(
            start.resumed_step,
            start.loaded.get("health"),
            own=start.resumed_own_checkpoint(parts.cfg.checkpoint.save),
        )
        checkpoints = Checkpointer.build(parts, start, guards, drills, job, reporter.logger)
        step = TrainStep.build(parts, batches, drills)
        return cls(parts, start, step, guards, checkpoints, reporter, drills, job, command)

    def begin(self, notes: list[str], *, was_complete: bool) -> None:
        """Rank 0 records the start in the save directory; the reporter announces it."""
        cfg, start = self.parts.cfg, self.start
        if self.parts.place.rank == 0 and cfg.checkpoint.save:
            run_dir.record_start(
                cfg,
                self.job,
                start.step,
                start.resumed_from,
                self.command,
                was_complete=was_complete,
            )
        self.reporter.announce(start, self.job, notes)

    def train(self) -> TrainResult:
        """The steps from the start to train.steps, or to a stop by a signal."""
        result = TrainResult(final_step=self.start.step, num_params=self.parts.num_params)
        handler = (
            faults.PreemptionHandler().install() if self.parts.cfg.faults.save_on_signal else None
        )
        try:
            self._steps(result, handler, faults.LauncherWatch())
        finally:
            if handler is not None:
                handler.uninstall()
            self.reporter.logger.close()
        if result.stopped_by_signal is None:
            self.reporter.farewell(
                result.history, result.final_step, result.skipped_steps, result.checkpoint
            )
        return result

    def _steps(
        self,
        result: TrainResult,
        handler: faults.PreemptionHandler | None,
        launcher: faults.LauncherWatch,
    ) -> None:
        cfg, on_cuda = self.parts.cfg, torch.cuda.is_available()
        for step in range(self.start.step + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            outcome = self.step(step)
            if on_cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            loss = float(outcome.terms[0])
            try:
                applied, spike = self.guards.check(
                    step, loss, outcome.grad_norm, outcome.block_size
                )
            except faults.TrainingHalted as exc:
                raise self.checkpoints.halt(exc, step, self.command) from None
            record = self.reporter.step(step, outcome, applied, spike, elapsed)
            result.history.append(record.to_json())
            result.final_step = step
            result.skipped_steps = self.guards.nonfinite.total_skipped
            self.drills.after_step(step)
            self.checkpoints.poll()  # finalise a background save whose writes are done
            preempted, orphaned = faults.any_rank_true_each(
                handler is not None and handler.poll() is not None, launcher.gone()
            )
            if orphaned:
                raise _orphaned(cfg, step)
            if self.checkpoints.due(step, preempted):
                result.checkpoint = str(self.checkpoints.save(step))
            if preempted:
                self.checkpoints.finish()  # the checkpoint is complete before the process exits
                result.stopped_by_signal = handler.poll() or "signal"
                self.reporter.stopped_by_signal(
                    result.stopped_by_signal, step, result.checkpoint, self.command
                )
                return
        # Every way out of the loop above has saved its last step (the final step is always due);
        # a halt raises.
        self.checkpoints.finish()
        if cfg.checkpoint.save and result.final_step == cfg.train.steps:
            self.checkpoints.mark_complete(result.final_step, result.checkpoint)


def _orphaned(cfg: TrainConfig, step: int) -> faults.LauncherGone:
    """The error of a worker whose torchrun launcher died: it stops rather than train on alone."""
    kept = (
        f"the newest checkpoint in {cfg.checkpoint.save} is kept; re-running the command continues "
        "from it"
        if cfg.checkpoint.save
        else "nothing was saved"
    )
    return faults.LauncherGone(
        f"the launcher that started this worker (torchrun) is gone: stopping after step {step} "
        f"instead of training on without it ({kept})"
    )
