"""Learning-rate schedules (docs/METHOD.md §6: "LR constant then cooled down", two-phase / WSD).

All styles share a linear warm-up from 0: ``lr = peak * step / warmup`` for ``step < warmup``, so
the LR is ``peak`` exactly at ``step == warmup``. Steps are 0-based optimizer steps; past ``total``
the LR stays at its final value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DECAY_SHAPES", "LR_STYLES", "LRSchedule", "lr_at"]

LR_STYLES = ("wsd", "cosine", "constant")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _cooldown(progress: float, peak: float, min_lr: float, shape: str) -> float:
    """LR at ``progress`` in [0, 1] of a cool-down from ``peak`` to ``min_lr``."""
    if shape == "linear":
        factor = 1.0 - progress
    elif shape == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # "1-sqrt" (Hägele et al. 2024, a common WSD cool-down)
        factor = 1.0 - math.sqrt(progress)
    return min_lr + (peak - min_lr) * factor


def lr_at(
    step: int,
    *,
    peak: float,
    min_lr: float,
    warmup: int,
    total: int,
    decay: int,
    style: str = "wsd",
    decay_shape: str = "linear",
) -> float:
    """Learning rate at an optimizer step (docs/METHOD.md §6, "LR constant then cooled down").

    - ``wsd`` (warm-up, stable, decay): warm-up, ``peak`` until ``total - decay``, then the last
      ``decay`` steps cool down to ``min_lr`` (reached at ``step == total``) with ``decay_shape`` in
      ``linear``, ``cosine`` or ``1-sqrt``. ``decay = 0`` means no cool-down.
    - ``cosine``: warm-up, then a cosine from ``peak`` at ``warmup`` to ``min_lr`` at ``total``
      (``decay`` and ``decay_shape`` are not used).
    - ``constant``: warm-up, then ``peak`` (``min_lr``, ``decay``, ``decay_shape`` are not used).
    """
    return LRSchedule(peak, min_lr, warmup, total, decay, style, decay_shape).at(step)


@dataclass(frozen=True)
class LRSchedule:
    """A learning-rate schedule (``lr_at`` describes the styles); checked when it is built."""

    peak: float
    """LR after the warm-up."""
    min_lr: float = 0.0
    """LR at the end of the cool-down (wsd) or of the cosine."""
    warmup: int = 0
    """Steps of the linear warm-up from 0."""
    total: int = 1
    """Steps of the whole schedule."""
    decay: int = 0
    """wsd: the last `decay` steps cool down to min_lr (0: no cool-down)."""
    style: str = "wsd"
    """One of wsd, cosine, constant."""
    decay_shape: str = "linear"
    """wsd cool-down shape: linear, cosine or 1-sqrt."""

    def __post_init__(self) -> None:
        peak, min_lr, warmup, total = self.peak, self.min_lr, self.warmup, self.total
        decay = self.decay
        if self.style not in LR_STYLES:
            raise ValueError(f"style must be one of {LR_STYLES}, got {self.style!r}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"decay_shape must be one of {DECAY_SHAPES}, got {self.decay_shape!r}")
        if not (peak > 0 and math.isfinite(peak)):
            raise ValueError(f"peak must be a finite number > 0, got {peak!r}")
        if not (0 <= min_lr <= peak):
            raise ValueError(f"min_lr must lie in [0, peak] = [0, {peak}], got {min_lr!r}")
        if not _is_int(total) or total < 1:
            raise ValueError(
                f"total (steps of the schedule) must be an integer >= 1, got {total!r}"
            )
        if not _is_int(warmup) or not (0 <= warmup <= total):
            raise ValueError(
                f"warmup must be an integer in [0, total] = [0, {total}], got {warmup!r}"
            )
        if not _is_int(decay) or decay < 0:
            raise ValueError(f"decay (cool-down steps) must be an integer >= 0, got {decay!r}")
        if self.style == "cosine" and warmup >= total:
            raise ValueError(
                f"cosine needs warmup < total (the cosine runs from step warmup to step total): "
                f"warmup {warmup}, total {total}"
            )
        if self.style == "wsd" and warmup + decay > total:
            raise ValueError(
                f"wsd needs warmup + decay <= total: warmup {warmup} + decay {decay} > total "
                f"{total}; decay must be <= {total - warmup}"
            )

    def at(self, step: int) -> float:
        """LR at ``step`` (an integer >= 0)."""
        if not _is_int(step) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        peak, warmup, total = self.peak, self.warmup, self.total
        if step < warmup:
            return peak * step / warmup
        if self.style == "constant":
            return float(peak)
        if self.style == "cosine":
            if step >= total:
                return float(self.min_lr)
            return _cooldown((step - warmup) / (total - warmup), peak, self.min_lr, "cosine")
        decay_start = total - self.decay
        if self.decay == 0 or step < decay_start:
            return float(peak)
        progress = min(1.0, (step - decay_start) / self.decay)
        return _cooldown(progress, peak, self.min_lr, self.decay_shape)
