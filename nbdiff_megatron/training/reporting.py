"""What a training run tells its user: the start, every step, a stop by a signal, the summary.

`Reporter` owns the run's `RunLogger` (console, progress bar, TensorBoard, W&B, metrics file:
training/logging.py) and the numbers a step record needs beyond the step itself (the model FLOPs of a
step as `nbdiff plan` counts them, so that the MFU of the log and of the plan agree). Rank 0 writes;
the other ranks' reporter is silent.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nbdiff_megatron.training import checkpointing
from nbdiff_megatron.training.checkpointer import Start
from nbdiff_megatron.training.config import TrainConfig
from nbdiff_megatron.training.logging import RunLogger, StepRecord, guess_peak_tflops
from nbdiff_megatron.training.plan import step_flops
from nbdiff_megatron.training.setup import Components
from nbdiff_megatron.training.step import StepOutcome


def output_paths(cfg: TrainConfig) -> tuple[str | None, str | None]:
    """The metrics file and the TensorBoard folder (by default inside checkpoint.save)."""
    save = cfg.checkpoint.save
    metrics = cfg.logging.metrics_file or (str(Path(save) / "metrics.jsonl") if save else None)
    tb = cfg.logging.tensorboard_dir or (str(Path(save) / "tensorboard") if save else None)
    return metrics, tb


def keep_aside(path: str | Path) -> Path | None:
    """Rename a non-empty file to `<stem>.before-<UTC time><suffix>` so a new start cannot clobber it.

    Returns the new name, or None when there was nothing to keep.
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = path.with_name(f"{path.stem}.before-{stamp}{path.suffix}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.stem}.before-{stamp}-{n}{path.suffix}")
    os.replace(path, target)
    return target


def wandb_id(save: str | None) -> str | None:
    """One W&B run id per save directory: every restart of a run continues the same W&B run."""
    if not save:
        return None
    return hashlib.sha1(str(Path(save).resolve()).encode()).hexdigest()[:16]


def say_already_complete(cfg: TrainConfig, marker: dict[str, Any]) -> None:
    """Rank 0's line for a start whose save directory holds the COMPLETE marker of train.steps."""
    if os.environ.get("RANK", "0") == "0":
        print(
            f"nbdiff train: {cfg.checkpoint.save} is already complete (step "
            f"{marker['step']} of train.steps={cfg.train.steps}, "
            f"{checkpointing.COMPLETE_FILE} marker); nothing to do. Raise --train.steps to "
            "train further.",
            flush=True,
        )


@dataclass
class Reporter:
    """The reports of one run (module docstring)."""

    parts: Components
    logger: RunLogger
    metrics_path: str | None
    tensorboard_dir: str | None
    kept_aside: Path | None
    """The metrics file of an earlier start, renamed so that this start does not clobber it."""
    step_flops: float
    """Model FLOPs of one step (NBDiff or AR, as the objective)."""
    peak_tflops: float | None
    """logging.peak_tflops, else this GPU's known peak (None: no MFU)."""

    @classmethod
    def open(cls, parts: Components, start: Start, label: str) -> Reporter:
        """Open the run's logger (rank 0 keeps an earlier start's metrics aside first: rule 3)."""
        cfg, rank = parts.cfg, parts.place.rank
        metrics_path, tb_dir = output_paths(cfg)
        kept = None
        if rank == 0 and metrics_path and not start.plan.same_run:
            kept = keep_aside(metrics_path)
        logger = RunLogger(
            enabled=rank == 0,
            total_steps=cfg.train.steps,
            start_step=start.step,
            log_interval=cfg.logging.log_interval,
            metrics_file=metrics_path,
            tensorboard_dir=tb_dir,
            progress_bar=cfg.logging.progress_bar,
            label=label,
            wandb_project=cfg.logging.wandb_project,
            wandb_mode=cfg.logging.wandb_mode,
            wandb_dir=cfg.checkpoint.save,
            wandb_id=wandb_id(cfg.checkpoint.save),
        )
        nbdiff_flops, ar_flops = step_flops(cfg)
        flops = ar_flops if parts.objective == "ar" else nbdiff_flops
        peak = cfg.logging.peak_tflops or guess_peak_tflops()
        return cls(parts, logger, metrics_path, tb_dir, kept, flops, peak)

    def announce(self, start: Start, job: dict[str, Any], notes: list[str]) -> None:
        """The start's lines: model, layout, curriculum, steps, how it starts and what changed."""
        logger = self.logger
        for line in start_lines(self.parts, start, job):
            logger.info(line)
        for note in notes:
            logger.info(f"  {note}")
        if start.changes:
            logger.info(f"  changed since {start.resumed_from}: " + "; ".join(start.changes))
        if self.kept_aside:
            logger.info(f"  kept the metrics of an earlier start as {self.kept_aside}")
        report_sft(logger, self.parts.cfg, self.parts.dataset)
        logger.run_metadata(
            {"config": self.parts.cfg.to_dict(), "job": job, "start_step": start.step}
        )

    def step(
        self, step: int, outcome: StepOutcome, applied: bool, spike: bool, elapsed: float
    ) -> StepRecord:
        """Log the record of a finished step and return it."""
        cfg = self.parts.cfg
        schedule = cfg.step_schedule()
        terms, peak = outcome.terms, self.peak_tflops
        world = self.parts.place.world
        record = StepRecord(
            step=step,
            loss=float(terms[0]),
            mdm=float(terms[1]),
            ar=float(terms[2]),
            block_size=outcome.block_size,
            ar_weight=outcome.ar_weight,
            lr=schedule.lr(step),
            grad_norm=outcome.grad_norm,
            skipped=not applied,
            mask_kind=cfg.curriculum.mask_kind,
            anneal_progress=schedule.anneal_progress(step),
            step_time=elapsed,
            tokens_per_s=cfg.tokens_per_step() / max(elapsed, 1e-9),
            mfu=(self.step_flops / elapsed / (world * peak * 1e12)) if peak else None,
            spike=spike,
        )
        self.logger.log_step(record)
        return record

    def stopped_by_signal(
        self, signal_name: str, step: int, checkpoint: str | None, command: str | None
    ) -> None:
        """The lines of a run that a signal stopped (after its checkpoint was saved)."""
        save = self.parts.cfg.checkpoint.save
        self.logger.info(
            f"received {signal_name}: "
            + (
                f"checkpoint saved at step {step} ({checkpoint}); exiting cleanly."
                if save
                else "no checkpoint.save configured, nothing saved; exiting cleanly."
            )
        )
        if save:
            self.logger.info(
                "resume with the same command (it continues from the newest checkpoint "
                f"in {save}): {command or 'nbdiff train ... (unchanged)'}"
            )

    def farewell(
        self,
        history: list[dict[str, Any]],
        final_step: int,
        skipped_steps: int,
        checkpoint: str | None,
    ) -> None:
        """The closing lines: the summary and where the run's outputs are."""
        logger = self.logger
        if not logger.enabled or not history:
            return
        logger.info(
            closing_summary(history, final_step, self.parts.cfg.train.steps)
            + (
                f"; {skipped_steps} step(s) skipped (non-finite loss or gradients)"
                if skipped_steps
                else ""
            )
        )
        for name, value in (
            ("checkpoint", checkpoint),
            ("metrics", self.metrics_path),
            ("tensorboard", self.tensorboard_dir),
        ):
            if value:
                logger.info(f"  {name:<11} {value}")


def start_lines(parts: Components, start: Start, job: dict[str, Any]) -> list[str]:
    """The lines that open a run's log: model, layout, objective or curriculum, steps, the start."""
    cfg, place = parts.cfg, parts.place
    par, m, loop, cur = cfg.parallel, cfg.model, cfg.train, cfg.curriculum
    ar = parts.objective == "ar"
    seq = cfg.seq_length()
    n = parts.num_params
    lines = [
        f"nbdiff train: {n / 1e6:.2f}M parameters ({n:,}; {m.num_layers} layers, hidden "
        f"{m.hidden_size}, vocab {m.vocab_size}), L = {seq} ("
        + ("AR objective: causal forward on L" if ar else f"forward on 2L = {2 * seq}")
        + f"), {parts.precision} on {place.device.type}",
        f"  layout: tp {par.tp} x pp {par.pp} x cp {par.cp} x dp {place.dp} = {place.world} "
        f"processes; global batch {loop.global_batch_size} = {place.dp} x "
        f"{loop.global_batch_size // place.dp // loop.micro_batch_size} micro-batches x "
        f"{loop.micro_batch_size}",
        "  objective: AR (next-token CE on x_0; the curriculum and the noise are not used)"
        if ar
        else f"  curriculum: B {cur.start_block_size} -> {cur.target_block_size} "
        f"(x{cur.growth_base} every {cur.growth_interval} steps after {cur.growth_warmup}), "
        f"λ = {cur.ar_weight}, mask {cur.mask_kind}, token shift "
        f"{'on' if cfg.loss.token_shift else 'off'}",
        f"  steps {start.step} -> {loop.steps}, {cfg.tokens_per_step():,} tokens/step, "
        f"{cfg.token_budget():,} tokens in all",
        f"  {start.plan.note}",
    ]
    if "job_id" in job:
        lines.append(
            f"  SLURM job {job['job_id']} on {job.get('nodes', job['host'])}"
            + (f" (restart {job['restart_count']})" if job.get("restart_count") else "")
        )
    return lines


def closing_summary(history: list[dict[str, Any]], final_step: int, total_steps: int) -> str:
    """The 'done' line: steps run by this start vs the run's total, and a like-with-like loss change.

    The loss is compared between the first and the last step at the LAST step's block size: losses at
    different block sizes (B = 1 is plain AR, B = 32 masks whole blocks) are not comparable.
    """
    ran = len(history)
    first_step = int(history[0]["step"])
    span = f"steps {first_step}-{final_step}" if ran > 1 else f"step {final_step}"
    text = (
        f"done: {ran} step{'s' if ran != 1 else ''} this start ({span}), {final_step}/{total_steps}"
    )
    block = history[-1].get("block_size")
    same = [r for r in history if r.get("block_size") == block]
    if len(same) >= 2:
        a, b = same[0], same[-1]
        text += (
            f"; loss at B={block}: {a['loss']:.4f} (step {a['step']}) -> {b['loss']:.4f} "
            f"(step {b['step']})"
        )
    else:
        text += f"; loss {history[-1]['loss']:.4f} at B={block}"
    return text


def report_sft(logger: RunLogger, cfg: TrainConfig, dataset: torch.utils.data.Dataset) -> None:
    """SFT accounting: conversations kept, truncated and dropped (by reason), never silent."""
    stats = getattr(dataset, "stats", None)
    if stats is None:
        return
    for line in f"SFT data: {stats.format()}".splitlines():
        logger.info(f"  {line}")
    too_long = sum(n for reason, n in stats.skipped.items() if "model.seq_length" in reason)
    if too_long and cfg.data.sft_overflow == "drop":
        logger.info(
            f"  {too_long} conversations were longer than model.seq_length={cfg.seq_length()}: "
            "raise it, or keep their first exchanges with --data.sft_overflow=truncate_turns"
        )
