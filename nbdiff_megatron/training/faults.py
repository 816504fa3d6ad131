"""Fault handling of the training loop: non-finite losses, preemption signals, fault drills.

- `NonFiniteGuard`: a step whose loss or global gradient norm is NaN/inf is skipped (no optimizer
  update) and counted; after `max_consecutive` such steps in a row the run halts with `TrainingHalted`.
- `SpikeGuard`: a step whose loss (or gradient norm) exceeds k times its moving average over the last
  healthy steps is a spike; after `max_consecutive` spikes in a row the run halts. A destroyed model
  (e.g. a far too high learning rate) often keeps a finite loss, stuck near ln V: only a spike shows it.
- `LevelShiftGuard`: the mean loss of the last `window` steps above `factor` times its lowest earlier
  mean (a lasting rise, which the spike averages absorb) halts the run; `Health` runs both watches.
- `HealthyCheckpoints`: which checkpoint is the last one known to be healthy (its weights gave a healthy
  next step), so that rotation never deletes it and a halt can name it and set `latest` back to it.
- `LauncherWatch`: a torchrun worker whose launcher died stops instead of training on.
- `PreemptionHandler`: SIGTERM / SIGUSR1 (what SLURM sends before preempting or at the time limit with
  `--signal`) and SIGINT (Ctrl-C) set a flag; the loop saves a checkpoint at the end of the step and exits
  0. A signal that arrived before the handler was installed is not lost when a launcher recorded it in the
  file named by NBDIFF_SIGNAL_FILE (the SLURM supervisor does, see training/cluster.py).
- `Guards`: the watches of one run (non-finite steps, spikes and level shifts, healthy checkpoints),
  built from the `faults` config section and asked once per step.
- `Drills`: fault drills for tests and for rehearsing recovery on a cluster, read from environment
  variables once, when a run starts (`Drills.from_env`), and handed to the step and the checkpoint
  writer: `NBDIFF_FAULT_KILL_AFTER_STEP=k` SIGKILLs the process right after step k is logged;
  `NBDIFF_FAULT_KILL_IN_SAVE=k` SIGKILLs it after the checkpoint of step k is written but before it is
  renamed into place; `NBDIFF_FAULT_NAN_STEPS=3,4` makes the loss of those steps NaN;
  `NBDIFF_FAULT_NAN_GRAD_STEPS=3` leaves the loss finite but puts a NaN into one gradient after the
  backward; `NBDIFF_FAULT_SPIKE_STEPS=5,6` multiplies the reported loss of those steps by 10 (a loss
  spike as the health checks see it); `NBDIFF_FAULT_KILL_IN_WRITE=k` SIGKILLs the process while the
  checkpoint writer's forked workers of step k are still writing (steps count from 1, as logged).
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from nbdiff_megatron import megatron_compat
from nbdiff_megatron.errors import NBDiffError

if TYPE_CHECKING:  # a type only: the SLURM supervisor (training/cluster.py) imports this module and
    # should start without the config's imports (YAML, the method's schedules)
    from nbdiff_megatron.training.config import FaultConfig


class TrainingHalted(NBDiffError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says what to try."""


class _BadStepRun:
    """The counting both step guards share: bad steps in a row and in all, and the halt when the
    run in a row reaches `max_consecutive`."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_bad = 0

    def _healthy(self) -> bool:
        self.consecutive = 0
        return True

    def _bad(self, step: int, what: str, limits: str) -> bool:
        """Count a bad step (False: skip it); raise TrainingHalted at the limit, saying `what` went
        wrong and which `limits` (config fields) set it."""
        self.consecutive += 1
        self.total_bad += 1
        if self.consecutive >= self.max_consecutive:
            raise TrainingHalted(
                f"{what} for {self.consecutive} steps in a row, up to step {step}; training "
                f"halted ({limits})."
            )
        return False


class NonFiniteGuard(_BadStepRun):
    """Counts skipped non-finite steps and halts after too many in a row."""

    @property
    def total_skipped(self) -> int:
        return self.total_bad

    def check(self, step: int, loss: float, grad_norm: float | None = None) -> bool:
        """Return True if the step may update the weights (loss and gradient norm finite); raise
        TrainingHalted after too many skips in a row."""
        if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
            return self._healthy()
        what = (
            f"the loss was {loss}"
            if not math.isfinite(loss)
            else f"the gradient norm was {grad_norm}"
        )
        return self._bad(
            step, f"{what} (not finite)", "faults.max_consecutive_nonfinite sets the limit"
        )


class SpikeGuard(_BadStepRun):
    """Loss and gradient-norm spikes against moving averages of the last `window` healthy steps."""

    def __init__(
        self, *, loss_factor: float, grad_factor: float, window: int, max_consecutive: int
    ) -> None:
        super().__init__(max_consecutive)
        self.loss_factor = loss_factor
        self.grad_factor = grad_factor
        self.losses: deque[float] = deque(maxlen=window)
        self.grads: deque[float] = deque(maxlen=window)
        self.regime: Any = None  # what the averages compare within (the block size moves the loss)

    def _spike(self, values: deque[float], value: float | None, factor: float) -> float | None:
        """The moving average that `value` exceeds `factor` times, or None."""
        if not factor or value is None or len(values) < (values.maxlen or 1):
            return None
        mean = sum(values) / len(values)
        return mean if value > factor * mean else None

    def state(self) -> dict[str, Any]:
        """The moving-average windows, stored in checkpoints so a resumed run watches at once."""
        return {"losses": list(self.losses), "grads": list(self.grads), "regime": self.regime}

    def load_state(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.losses.extend(state.get("losses", []))
        self.grads.extend(state.get("grads", []))
        self.regime = state.get("regime")

    def check(
        self, step: int, loss: float, grad_norm: float | None = None, regime: Any = None
    ) -> bool:
        """True if the step is healthy (no spike); raise TrainingHalted after too many in a row.

        Only finite steps are passed here (NonFiniteGuard handles the others). A new `regime` (the
        curriculum grew the block size, which moves the loss) starts the moving averages afresh."""
        if regime != self.regime:
            self.regime = regime
            self.losses.clear()
            self.grads.clear()
        loss_mean = self._spike(self.losses, loss, self.loss_factor)
        grad_mean = self._spike(self.grads, grad_norm, self.grad_factor)
        if loss_mean is None and grad_mean is None:
            self.losses.append(loss)
            if grad_norm is not None:
                self.grads.append(grad_norm)
            return self._healthy()
        what = (
            f"the loss ({loss:.4g}) was above {self.loss_factor:g} x its moving average "
            f"({loss_mean:.4g})"
            if loss_mean is not None
            else f"the gradient norm ({grad_norm:.4g}) was above {self.grad_factor:g} x its "
            f"moving average ({grad_mean:.4g})"
        )
        return self._bad(
            step,
            what,
            "faults.spike_factor, faults.grad_spike_factor and faults.max_consecutive_spikes set "
            "the limits",
        )


class LevelShiftGuard:
    """A lasting rise of the loss that no single step shows as a spike (e.g. a far too high learning
    rate puts a trained model back near ln V for good, and the spike averages absorb it).

    The mean of the last `window` non-spike losses is compared with the lowest such mean seen in the
    same regime (the pre-shift level); above `factor` times it, the run halts. 0 = off."""

    def __init__(self, *, factor: float, window: int) -> None:
        self.factor = factor
        self.window = window
        self.losses: deque[float] = deque(maxlen=max(window, 1))
        self.best: float | None = None
        self.regime: Any = None

    def state(self) -> dict[str, Any]:
        return {
            "losses": list(self.losses),
            "best": self.best,
            "regime": self.regime,
            "factor": self.factor,
            "window": self.window,
        }

    def load_state(self, state: dict[str, Any] | None) -> None:
        """The saved level; the thresholds are this start's config (faults.level_*)."""
        if not state:
            return
        self.losses.extend(state.get("losses", []))
        self.best = state.get("best")
        self.regime = state.get("regime")

    def check(self, step: int, loss: float, regime: Any = None) -> None:
        """Add a healthy (finite, non-spike) step's loss; raise TrainingHalted on a level shift."""
        if regime != self.regime:
            self.regime = regime
            self.losses.clear()
            self.best = None
        self.losses.append(loss)
        if not self.factor or not self.window or len(self.losses) < self.window:
            return
        mean = sum(self.losses) / len(self.losses)
        if self.best is not None and mean > self.factor * self.best:
            raise LevelShift(
                f"the loss rose and stayed up: its mean over the last {self.window} steps "
                f"({mean:.4g}) is {mean / self.best:.2f} x its earlier level ({self.best:.4g}), up "
                f"to step {step}; training halted (faults.level_factor={self.factor:g} and "
                f"faults.level_window={self.window} set the limits)."
            )
        self.best = mean if self.best is None else min(self.best, mean)


class LevelShift(TrainingHalted):
    """The loss rose to a new level and stayed there (LevelShiftGuard)."""


class Health:
    """The run's loss watches: spikes (SpikeGuard) and level shifts (LevelShiftGuard); their state
    is saved with every checkpoint so that a resumed run watches against the level before it."""

    def __init__(self, spikes: SpikeGuard, level: LevelShiftGuard) -> None:
        self.spikes = spikes
        self.level = level

    def check(self, step: int, loss: float, grad_norm: float | None, regime: Any) -> bool:
        """True if the (finite) step is healthy; raises TrainingHalted on a halt."""
        healthy = self.spikes.check(step, loss, grad_norm, regime=regime)
        if healthy:
            self.level.check(step, loss, regime=regime)
        return healthy

    def state(self) -> dict[str, Any]:
        return {**self.spikes.state(), "level": self.level.state()}

    def load_state(self, state: dict[str, Any] | None) -> None:
        self.spikes.load_state(state)
        self.level.load_state((state or {}).get("level"))


class HealthyCheckpoints:
    """Tracks the newest checkpoint whose weights are known to be healthy.

    The loss of step s is measured on the weights after step s - 1, so the checkpoint of step k is
    healthy once step k + 1 was healthy; the checkpoint just before the first anomalous step s (k = s - 1)
    already holds the weights that produced the anomaly and is not trusted. A level shift shows only
    after `confirm_after` steps (the level window), so a checkpoint counts as healthy against level
    shifts (`confirmed`) once that many steps after it passed the level check. The checkpoint this
    start resumed from (`resumed`, written by an earlier start) is kept until a newer one is confirmed
    and is never set aside.
    """

    def __init__(self, confirm_after: int = 0) -> None:
        self.saved: list[int] = []
        self.healthy: int | None = None
        self.verified: list[int] = []
        self.confirmed: int | None = None
        self.resumed: int | None = None
        self.confirm_after = confirm_after

    def started_from(self, step: int) -> None:
        """The run resumed from the checkpoint of `step` (verified by the next step like any other)."""
        self.saved.append(step)
        self.resumed = step

    def saved_at(self, step: int) -> None:
        self.saved.append(step)

    def step_done(self, step: int, healthy: bool) -> None:
        """Step `step` (1-based) finished: healthy or not (a halting step never gets here)."""
        if healthy and (step - 1) in self.saved:
            self.healthy = step - 1
            self.verified.append(step - 1)
        ready = [s for s in self.verified if s + self.confirm_after <= step]
        if ready:
            self.confirmed = max(ready)

    def last_good(self, level_shift: bool = False) -> int | None:
        """The checkpoint a halt goes back to: the newest healthy one (confirmed against level shifts
        for a level-shift halt), else the one this start resumed from."""
        good = self.confirmed if level_shift else self.healthy
        return good if good is not None else self.resumed

    def protected(self) -> set[int]:
        """Checkpoint steps that rotation must keep."""
        keep = {self.healthy, self.confirmed}
        if self.confirmed is None:
            keep.add(self.resumed)
        return {s for s in keep if s is not None}

    def suspect(self, level_shift: bool = False) -> list[int]:
        """Checkpoints written after the last good one (their weights may be damaged)."""
        good = self.last_good(level_shift)
        floor = -1 if good is None else good
        return sorted(s for s in set(self.saved) if s > floor)


@dataclass
class Guards:
    """The watches of one run, asked once per finished step: non-finite steps (`nonfinite`), spikes
    and level shifts (`health`, saved with every checkpoint), and which checkpoint is the last healthy
    one (`healthy`, which the checkpoint writer asks)."""

    nonfinite: NonFiniteGuard
    health: Health
    healthy: HealthyCheckpoints

    @classmethod
    def from_config(cls, fc: FaultConfig) -> Guards:
        """The guards with the limits of the `faults` config section."""
        spikes = SpikeGuard(
            loss_factor=fc.spike_factor,
            grad_factor=fc.grad_spike_factor,
            window=fc.spike_window,
            max_consecutive=fc.max_consecutive_spikes,
        )
        level = LevelShiftGuard(factor=fc.level_factor, window=fc.level_window)
        return cls(
            NonFiniteGuard(fc.max_consecutive_nonfinite),
            Health(spikes, level),
            HealthyCheckpoints(confirm_after=fc.level_window if fc.level_factor else 0),
        )

    def resume(self, step: int | None, saved: dict[str, Any] | None, own: bool) -> None:
        """A start from the full state of the checkpoint of `step` (None: a fresh or weights-only
        start): its watches' state `saved`, and, when it is a checkpoint of this run's save
        directory (`own`), the one a halt may go back to until a newer one is verified."""
        if step is None:
            return
        self.health.load_state(saved)
        if own:
            self.healthy.started_from(step)

    def check(
        self, step: int, loss: float, grad_norm: float | None, regime: Any
    ) -> tuple[bool, bool]:
        """(applied, spike) of a finished step: applied when its loss and gradient norm were finite.
        Raises TrainingHalted when a limit is reached."""
        applied = self.nonfinite.check(step, loss, grad_norm)
        spike = applied and not self.health.check(step, loss, grad_norm, regime=regime)
        self.healthy.step_done(step, applied and not spike)
        return applied, spike


class LauncherWatch:
    """Notices that the torchrun agent which started this worker is gone (killed with SIGKILL, or by a
    signal it does not forward): its workers are re-parented and must stop rather than train on beside
    a re-run. Only under torchrun (TORCHELASTIC_RUN_ID): a plain `nbdiff train` may outlive its shell."""

    def __init__(self) -> None:
        self.parent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None

    def gone(self) -> bool:
        return self.parent is not None and os.getppid() != self.parent


class LauncherGone(TrainingHalted):
    """The launcher of this worker died; the worker stops."""


SIGNAL_FILE_ENV = "NBDIFF_SIGNAL_FILE"


class PreemptionHandler:
    """Turns SIGTERM / SIGUSR1 / SIGINT into a flag that the loop checks once per step.

    A second Ctrl-C stops at once (KeyboardInterrupt) for someone who does not want to wait for the save.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}
        self._file = os.environ.get(SIGNAL_FILE_ENV) or None

    def install(self) -> PreemptionHandler:
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            self._previous[signum] = signal.signal(signum, self._handle)
        self.poll()
        return self

    def poll(self) -> str | None:
        """The signal received so far: by this process, or recorded by a launcher in the signal file
        (e.g. before the handler was installed)."""
        if self.received is None and self._file and os.path.exists(self._file):
            try:
                with open(self._file) as f:
                    self.received = f.read().strip() or "SIGTERM"
            except OSError:
                pass
        return self.received

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":
            raise KeyboardInterrupt
        if name == "SIGINT" and os.environ.get("RANK", "0") == "0":
            print(
                "Ctrl-C: saving a checkpoint at the end of this step, then stopping "
                "(press Ctrl-C again to stop at once without saving)",
                flush=True,
            )
        self.received = name

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous.clear()


def any_rank_true(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank (so all ranks save and stop together)."""
    return any_rank_true_each(flag)[0]


def any_rank_true_each(*flags: bool) -> tuple[bool, ...]:
    """`any_rank_true` of several flags in one all-reduce."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tuple(bool(f) for f in flags)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    value = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    with megatron_compat.cuda_to_cpu():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return tuple(bool(v > 0) for v in value.tolist())


# ---------------------------------------------------------------------------------- fault drills


def _env_steps(environ: Mapping[str, str], name: str) -> frozenset[int]:
    text = environ.get(name, "").strip()
    if not text:
        return frozenset()
    return frozenset(int(part) for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class Drills:
    """The fault drills of a run (module docstring): steps, counted from 1 as logged."""

    kill_after_steps: frozenset[int] = frozenset()
    """NBDIFF_FAULT_KILL_AFTER_STEP: SIGKILL right after the step is logged (a node failure)."""
    kill_in_save_steps: frozenset[int] = frozenset()
    """NBDIFF_FAULT_KILL_IN_SAVE: SIGKILL with the step's checkpoint written but not renamed."""
    kill_in_write_steps: frozenset[int] = frozenset()
    """NBDIFF_FAULT_KILL_IN_WRITE: SIGKILL while the step's checkpoint writers still write."""
    nan_loss_steps: frozenset[int] = frozenset()
    """NBDIFF_FAULT_NAN_STEPS: the loss of the step is NaN (through the loss and the gradients)."""
    nan_grad_steps: frozenset[int] = frozenset()
    """NBDIFF_FAULT_NAN_GRAD_STEPS: the loss stays finite, one gradient gets a NaN."""
    spike_steps: frozenset[int] = frozenset()
    """NBDIFF_FAULT_SPIKE_STEPS: the reported loss of the step is multiplied by 10."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Drills:
        """The drills the environment asks for (none: every field empty)."""
        env = os.environ if environ is None else environ
        return cls(
            kill_after_steps=_env_steps(env, "NBDIFF_FAULT_KILL_AFTER_STEP"),
            kill_in_save_steps=_env_steps(env, "NBDIFF_FAULT_KILL_IN_SAVE"),
            kill_in_write_steps=_env_steps(env, "NBDIFF_FAULT_KILL_IN_WRITE"),
            nan_loss_steps=_env_steps(env, "NBDIFF_FAULT_NAN_STEPS"),
            nan_grad_steps=_env_steps(env, "NBDIFF_FAULT_NAN_GRAD_STEPS"),
            spike_steps=_env_steps(env, "NBDIFF_FAULT_SPIKE_STEPS"),
        )

    def after_step(self, step: int) -> None:
        """The KILL_AFTER_STEP drill: die like a node failure right after `step`."""
        if step in self.kill_after_steps:
            _kill_self()

    def during_save(self, step: int) -> None:
        """The KILL_IN_SAVE drill: die with the checkpoint of `step` written but not renamed."""
        if step in self.kill_in_save_steps:
            _kill_self()

    def before_write(self, step: int) -> None:
        """The KILL_IN_WRITE drill: arm the fork hooks before the writers of `step` are forked."""
        if step in self.kill_in_write_steps:
            _arm_kill_in_write()


NO_DRILLS = Drills()
"""No drill: what a save outside a training run uses."""


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


def children_die_with_this_process() -> None:
    """Make every process forked from here on get SIGKILL when this process dies (Linux).

    dist_checkpointing's writer forks worker processes; if the trainer is killed with SIGKILL
    mid-save they would live on (parent pid 1, holding the trainer's stdout open, so that
    `nbdiff train ... | tee log` never ends). PR_SET_PDEATHSIG in each child ties it to us.
    """
    global _DEATHSIG_ARMED
    if _DEATHSIG_ARMED or not sys.platform.startswith("linux"):
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    forking = [0]

    def before() -> None:
        forking[0] = os.getpid()

    def in_child() -> None:
        prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != forking[0]:  # the parent died before prctl took effect
            os._exit(1)

    os.register_at_fork(before=before, after_in_child=in_child)
    _DEATHSIG_ARMED = True


_DEATHSIG_ARMED = False
_KILL_IN_WRITE = False


def _arm_kill_in_write() -> None:
    """The KILL_IN_WRITE drill: the checkpoint writer's forked workers stall (a slow file system) and
    the trainer dies of SIGKILL right after forking them (armed once per process)."""
    global _KILL_IN_WRITE
    if _KILL_IN_WRITE:
        return
    _KILL_IN_WRITE = True

    def in_parent() -> None:
        if _KILL_IN_WRITE:
            _kill_self()

    def in_child() -> None:
        if _KILL_IN_WRITE:
            time.sleep(120)
            os._exit(0)

    os.register_at_fork(after_in_parent=in_parent, after_in_child=in_child)


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
