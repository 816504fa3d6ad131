"""Fault handling of the training loop: non-finite losses, preemption signals, fault drills.

- `NonFiniteGuard`: a step whose loss or global gradient norm is NaN/inf is skipped (no optimizer
  update) and counted; after `max_consecutive` such steps in a row the run halts with `TrainingHalted`.
- `PreemptionHandler`: SIGTERM / SIGUSR1 (what SLURM sends before preempting or at the time limit with
  `--signal`) set a flag; the loop saves a checkpoint at the end of the step and exits 0.
- Fault drills for tests and for rehearsing recovery on a cluster, driven by environment variables:
  `NBDIFF_FAULT_KILL_AFTER_STEP=k` SIGKILLs the process right after step k is logged;
  `NBDIFF_FAULT_KILL_IN_SAVE=k` SIGKILLs it after the checkpoint of step k is written but before it is
  renamed into place; `NBDIFF_FAULT_NAN_STEPS=3,4` makes the loss of those steps NaN;
  `NBDIFF_FAULT_NAN_GRAD_STEPS=3` leaves the loss finite but puts a NaN into one gradient after the
  backward (steps count from 1, as logged).
"""

from __future__ import annotations

import math
import os
import signal
from typing import Any

from nbdiff_megatron.errors import NBDiffError


class TrainingHalted(NBDiffError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says what to try."""


class NonFiniteGuard:
    """Counts skipped non-finite steps and halts after too many in a row."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0

    def check(self, step: int, loss: float, grad_norm: float | None = None) -> bool:
        """Return True if the step may update the weights (loss and gradient norm finite); raise
        TrainingHalted after too many skips in a row."""
        if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total_skipped += 1
        if self.consecutive >= self.max_consecutive:
            what = (
                f"the loss was {loss}"
                if not math.isfinite(loss)
                else f"the gradient norm was {grad_norm}"
            )
            raise TrainingHalted(
                f"{what} (not finite) for {self.consecutive} steps in a row, up to step "
                f"{step}; training halted. Lower optimizer.lr, check the data around this point, or "
                "resume from the last checkpoint (faults.max_consecutive_nonfinite sets the limit)"
            )
        return False


class PreemptionHandler:
    """Turns SIGTERM / SIGUSR1 into a flag that the loop checks once per step."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionHandler:
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous.clear()


def any_rank_true(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank (so all ranks save and stop together)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    from nbdiff_megatron.model import cpu_compat

    device = "cuda" if torch.cuda.is_available() else "cpu"
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    with cpu_compat.cuda_to_cpu():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


# ---------------------------------------------------------------------------------- fault drills


def _env_steps(name: str) -> set[int]:
    text = os.environ.get(name, "").strip()
    if not text:
        return set()
    return {int(part) for part in text.split(",") if part.strip()}


def nan_drill_steps() -> set[int]:
    """Steps whose loss the NBDIFF_FAULT_NAN_STEPS drill turns into NaN."""
    return _env_steps("NBDIFF_FAULT_NAN_STEPS")


def nan_grad_drill_steps() -> set[int]:
    """Steps whose gradients the NBDIFF_FAULT_NAN_GRAD_STEPS drill poisons (the loss stays finite)."""
    return _env_steps("NBDIFF_FAULT_NAN_GRAD_STEPS")


def poison_one_gradient(model: Any) -> None:
    """Put a NaN into the first gradient element this rank holds (after the DDP reduction).

    megatron's DDP keeps the reduced gradient in `param.main_grad` (its grad buffer); plain modules
    in `param.grad`.
    """
    for param in model.parameters():
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad
        if grad is not None and grad.numel():
            grad.view(-1)[0] = float("nan")
            return


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_kill_after_step(step: int) -> None:
    """NBDIFF_FAULT_KILL_AFTER_STEP drill: die like a node failure right after `step`."""
    if step in _env_steps("NBDIFF_FAULT_KILL_AFTER_STEP"):
        _kill_self()


def maybe_kill_during_save(step: int) -> None:
    """NBDIFF_FAULT_KILL_IN_SAVE drill: die with the checkpoint of `step` written but not renamed."""
    if step in _env_steps("NBDIFF_FAULT_KILL_IN_SAVE"):
        _kill_self()
