"""What a training run reports: console lines, a progress bar with ETA, TensorBoard, Weights & Biases
(optional), a metrics file.

Only rank 0 writes. The metrics file (JSON lines, one record per optimizer step) is what tests, the demo
plots and resumption read; a resumed run first drops the records of steps it is about to redo, so the
file always holds one clean curve.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nbdiff_megatron.errors import ConfigError

# Peak dense bf16 TFLOP/s per GPU, for the MFU estimate when logging.peak_tflops is not set.
_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "B200": 2250.0,
    "GB200": 2500.0,
}


def guess_peak_tflops() -> float | None:
    """Peak bf16 TFLOP/s of this machine's GPU (None on CPU or for an unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().upper()
    for key, value in _PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics file, one per step (the last record wins if a step appears twice)."""
    by_step: dict[int, dict[str, Any]] = {}
    path = Path(path)
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def truncate_metrics(path: str | Path, keep_up_to_step: int) -> None:
    """Drop the records of steps > keep_up_to_step (a resumed run redoes them)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if int(r["step"]) <= keep_up_to_step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)


def _format_rate(value: float) -> str:
    for unit, scale in (("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


@dataclass
class StepRecord:
    """What one optimizer step reports."""

    step: int
    loss: float
    mdm: float
    ar: float
    block_size: int
    ar_weight: float
    lr: float
    grad_norm: float | None
    skipped: bool
    step_time: float
    tokens_per_s: float
    mfu: float | None
    spike: bool = False
    """The loss or gradient norm spiked above its moving average (faults.SpikeGuard)."""
    mask_kind: str = "context_causal"
    """curriculum.mask_kind the step trained with (context_causal, block_causal, annealed)."""
    anneal_progress: float | None = None
    """mask_kind annealed: the mask's progress at this step (0 = B=1 mask, 1 = target mask)."""

    def to_json(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and not math.isfinite(v) else v

        def raw(v: float | None) -> str | None:  # JSON has no NaN/inf: keep which one it was
            return repr(v) if v is not None and not math.isfinite(v) else None

        return {k: clean(v) for k, v in self.__dict__.items()} | {
            "loss_raw": raw(self.loss),
            "grad_norm_raw": raw(self.grad_norm),
        }


class RunLogger:
    """Console + progress bar + TensorBoard + metrics file, on rank 0 only."""

    def __init__(
        self,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        log_interval: int,
        metrics_file: str | None,
        tensorboard_dir: str | None,
        progress_bar: bool,
        label: str = "train",
        wandb_project: str | None = None,
        wandb_mode: str = "online",
        wandb_dir: str | None = None,
        wandb_id: str | None = None,
    ) -> None:
        self.enabled = enabled
        self.log_interval = log_interval
        self.total_steps = total_steps
        self.start_step = start_step
        self.metrics_path = Path(metrics_file) if metrics_file else None
        self.writer = None
        self.wandb = None
        self.bar = None
        self._want_bar = False
        self._label = label
        self.started = time.monotonic()
        if not enabled:
            return
        if self.metrics_path is not None:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            truncate_metrics(self.metrics_path, start_step)
        if tensorboard_dir:
            try:
                # may be missing (handled below); only a run with a tensorboard_dir imports it
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=tensorboard_dir, purge_step=start_step + 1)
            except ImportError:  # tensorboard not installed: console and metrics file still work
                self.writer = None
        if wandb_project:
            self.wandb = open_wandb(wandb_project, wandb_mode, wandb_dir, wandb_id, start_step)
        self._want_bar = progress_bar
        self._label = label

    def run_metadata(self, meta: dict[str, Any]) -> None:
        """Record the run's config and where it runs (job id, nodes) in TensorBoard and W&B."""
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.add_text("run/metadata", "```\n" + json.dumps(meta, indent=1) + "\n```")
        if self.wandb is not None:
            self.wandb.config.update(meta, allow_val_change=True)

    def _open_bar(self) -> None:
        # disable=None: no bar when stderr is not a terminal (CI logs, pipes), lines only.
        self.bar = tqdm(
            total=self.total_steps,
            initial=self.start_step,
            desc=self._label,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            leave=False,
            mininterval=0.5,
            disable=None,
        )
        self._want_bar = False

    def info(self, message: str) -> None:
        """A console line that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def log_step(self, record: StepRecord) -> None:
        if not self.enabled:
            return
        if self.metrics_path is not None:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record.to_json()) + "\n")
        if self.writer is not None:
            s = record.step
            scalars = {
                "loss/total": record.loss,
                "loss/mdm": record.mdm,
                "loss/ar": record.ar,
                "curriculum/block_size": record.block_size,
                "curriculum/ar_weight": record.ar_weight,
                "optimizer/lr": record.lr,
                "throughput/tokens_per_s": record.tokens_per_s,
                "faults/skipped": float(record.skipped),
            }
            if record.grad_norm is not None:
                scalars["optimizer/grad_norm"] = record.grad_norm
            if record.mfu is not None:
                scalars["throughput/mfu"] = record.mfu
            for key, value in scalars.items():
                if math.isfinite(value):
                    self.writer.add_scalar(key, value, s)
        if self.wandb is not None:
            self.wandb.log(
                {
                    k: v
                    for k, v in record.to_json().items()
                    if isinstance(v, (int, float)) and k != "step"
                },
                step=record.step,
            )
        if self._want_bar:
            self._open_bar()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record.loss:.3f}", B=record.block_size, refresh=False)
        if (
            record.step % self.log_interval == 0
            or record.step == self.total_steps
            or record.skipped
            or record.spike
        ):
            self.info(self.format_line(record))

    def format_line(self, r: StepRecord) -> str:
        width = len(str(self.total_steps))
        parts = [
            f"step {r.step:>{width}}/{self.total_steps}",
            f"loss {r.loss:7.4f}",
            f"mdm {r.mdm:7.4f}",
            f"ar {r.ar:7.4f}",
            f"B {r.block_size:>2}",
            f"λ {r.ar_weight:.2f}",
            f"lr {r.lr:.2e}",
            f"|g| {r.grad_norm:6.3f}" if r.grad_norm is not None else "|g|    n/a",
            f"{_format_rate(r.tokens_per_s)} tok/s",
        ]
        if r.mfu is not None:
            parts.append(f"MFU {100 * r.mfu:4.1f}%")
        if r.skipped:
            what = "loss" if not math.isfinite(r.loss) else "gradient norm"
            parts.append(f"SKIPPED (non-finite {what})")
        elif r.spike:
            parts.append("SPIKE (above its moving average)")
        return "  ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def open_wandb(
    project: str, mode: str, directory: str | None, run_id: str | None, start_step: int
) -> Any:
    """A Weights & Biases run (the optional `wandb` package); a requeued job continues the same run.

    `run_id` is stable per save directory, so every restart of a run logs into one W&B run (resume
    "allow"). Offline mode writes under `directory` for a later `wandb sync` (no network needed).
    """
    try:
        import wandb  # optional dependency (the `wandb` extra): only asked for by logging.wandb_project
    except ImportError:
        raise ConfigError(
            f"logging.wandb_project={project!r} needs the optional `wandb` package: "
            "pip install wandb (or drop logging.wandb_project)"
        ) from None
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=project,
        mode=mode,
        dir=directory,
        id=run_id,
        resume="allow" if run_id else None,
    )
