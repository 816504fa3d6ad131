"""Gradual block growth and its co-schedules (docs/METHOD.md §5, eq. 3; §4 for the AR weight).

Everything here is a function of the step number only, so every pipeline stage and every rank
computes the same block size, AR weight and annealed-mask progress without communication.

What "step k" means (one meaning for the whole project). Training steps are numbered k = 1, 2, ...,
train.steps: step k is the k-th optimizer update. Step k trains with B(k) = ``block_size_at(k)``,
λ(k), the learning rate ``lr_at(k)`` (method/schedules.py), noise drawn from a generator seeded with
k (training/batches.py ``noise_seed``); the log line, the metrics record and TensorBoard call it step k,
and the checkpoint written after it is ``iter_{k:07d}`` (k steps done; resuming from it runs step
k + 1 next). So the target block size first trains at step ``growth_end_step()``, the step eq. 3
names (the paper's ablation: B = 32 from step 2500 with Δ = 500); the first plateau, B0 on steps
1..s_w + Δ - 1, is one step shorter than the others because there is no step 0.

The refinement steps per block are the decoder's setting (``nbdiff generate``), not a training
co-schedule: training never looks at them, so nothing here schedules them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "AR_WEIGHT_STYLES",
    "Curriculum",
    "ar_weight_at",
    "block_size_at",
    "growth_end_step",
    "interval_to_finish_by",
]

AR_WEIGHT_STYLES = ("constant", "linear", "cosine")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_growth(target: int, start: int, base: int, interval: int, warmup: int) -> None:
    if not _is_int(start) or start < 1:
        raise ValueError(f"start (B0) must be an integer >= 1, got {start!r}")
    if not _is_int(target) or target < start:
        raise ValueError(f"target (B_target) must be an integer >= start = {start}, got {target!r}")
    if not _is_int(base) or base < 2:
        raise ValueError(f"base (r) must be an integer >= 2, got {base!r}")
    if not _is_int(interval) or interval < 1:
        raise ValueError(
            f"interval (Δ, steps per plateau) must be an integer >= 1, got {interval!r}"
        )
    if not _is_int(warmup) or warmup < 0:
        raise ValueError(f"warmup (s_w) must be an integer >= 0, got {warmup!r}")


def _check_step(step: int) -> None:
    if not _is_int(step) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")


def _doublings_to_target(target: int, start: int, base: int) -> int:
    """Smallest n with start * base**n >= target."""
    n, size = 0, start
    while size < target:
        size *= base
        n += 1
    return n


def block_size_at(
    step: int, *, target: int = 32, start: int = 1, base: int = 2, interval: int, warmup: int = 0
) -> int:
    """Block size at a step, docs/METHOD.md eq. 3.

    ``B(s) = min(B0 * r ** floor(max(0, s - s_w) / Δ), B_target)`` with ``B0 = start``,
    ``r = base``, ``Δ = interval``, ``s_w = warmup``. Example (the paper's ablation, target 32
    reached at step 2500 of 4000): ``interval=500, warmup=0`` gives 1 on [0, 500), 2, 4, 8, 16, then
    32 from step 2500.
    """
    _check_step(step)
    _check_growth(target, start, base, interval, warmup)
    plateaus = max(0, step - warmup) // interval
    # Multiply step by step instead of base ** plateaus: plateaus can be huge late in training.
    size = start
    for _ in range(plateaus):
        if size >= target:
            break
        size *= base
    return min(size, target)


def growth_end_step(
    *, target: int = 32, start: int = 1, base: int = 2, interval: int, warmup: int = 0
) -> int:
    """First step at which eq. 3 reaches ``target``: ``s_w + n Δ`` with ``n`` the growth plateaus
    (0 when ``start == target``: there is no growth)."""
    _check_growth(target, start, base, interval, warmup)
    plateaus = _doublings_to_target(target, start, base)
    return 0 if plateaus == 0 else warmup + plateaus * interval


def interval_to_finish_by(
    finish_step: int, *, target: int = 32, start: int = 1, base: int = 2, warmup: int = 0
) -> int:
    """Largest interval Δ whose growth (eq. 3) reaches ``target`` by ``finish_step``.

    ``Δ = floor((finish_step - s_w) / n)``; e.g. the paper's "growth finished by 2500" with B 1 ->
    32 (n = 5) and no warm-up gives Δ = 500.
    """
    _check_growth(target, start, base, 1, warmup)
    n = _doublings_to_target(target, start, base)
    if n == 0:
        raise ValueError(f"target {target} == start {start}: there is no growth to schedule")
    if not _is_int(finish_step) or finish_step < warmup + n:
        raise ValueError(
            f"finish_step must be an integer >= warmup + {n} plateaus = {warmup + n}, "
            f"got {finish_step!r}"
        )
    return (finish_step - warmup) // n


def ar_weight_at(
    block_size: int,
    *,
    start_weight: float = 0.5,
    end_weight: float = 0.5,
    start: int = 1,
    target: int = 32,
    style: str = "constant",
) -> float:
    """AR-loss weight λ of eq. 2 for the current block size (docs/METHOD.md §4 "Total", §5 co-schedules).

    λ is annealed in ``log2`` of the block size: with ``f = log2(B / start) / log2(target / start)``
    (``f = 1`` when ``start == target``), ``constant``: ``λ = start_weight``; ``linear``:
    ``λ = start_weight + (end_weight - start_weight) f``; ``cosine``:
    ``λ = end_weight + (start_weight - end_weight) (1 + cos(π f)) / 2``. So λ is ``start_weight`` at
    ``B = start`` and ``end_weight`` at ``B = target``. Project default: λ = 0.5, constant.
    """
    if style not in AR_WEIGHT_STYLES:
        raise ValueError(f"style must be one of {AR_WEIGHT_STYLES}, got {style!r}")
    for name, weight in (("start_weight", start_weight), ("end_weight", end_weight)):
        if not (0.0 <= weight <= 1.0):
            raise ValueError(f"{name} (λ) must lie in [0, 1], got {weight!r}")
    if not _is_int(start) or start < 1:
        raise ValueError(f"start must be an integer >= 1, got {start!r}")
    if not _is_int(target) or target < start:
        raise ValueError(f"target must be an integer >= start = {start}, got {target!r}")
    if not _is_int(block_size) or not (start <= block_size <= target):
        raise ValueError(
            f"block_size must be an integer in [start, target] = [{start}, {target}], "
            f"got {block_size!r}"
        )
    if style == "constant":
        return float(start_weight)
    frac = 1.0 if target == start else math.log2(block_size / start) / math.log2(target / start)
    if style == "linear":
        return start_weight + (end_weight - start_weight) * frac
    return end_weight + (start_weight - end_weight) * 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass(frozen=True)
class Curriculum:
    """Block growth (eq. 3) with its AR-weight co-schedule (docs/METHOD.md §5)."""

    target: int = 32
    """Final block size B_target."""
    start: int = 1
    """Initial block size B0 (1 = plain AR)."""
    base: int = 2
    """Growth factor r between plateaus."""
    interval: int = 500
    """Steps per plateau Δ (500: 1 -> 32 finished by step 2500, the paper's ablation)."""
    warmup: int = 0
    """Steps s_w at B0 before growth starts."""
    ar_weight_start: float = 0.5
    """AR-loss weight λ at B = start (project default 0.5)."""
    ar_weight_end: float = 0.5
    """AR-loss weight λ at B = target."""
    ar_weight_style: str = "constant"
    """How λ moves between the two, in log2(B): constant, linear or cosine."""

    def __post_init__(self) -> None:
        _check_growth(self.target, self.start, self.base, self.interval, self.warmup)
        # The λ co-schedule validates its own fields; call it once at both ends of the growth.
        for size in (self.start, self.target):
            self._ar_weight_of(size)

    def _ar_weight_of(self, size: int) -> float:
        return ar_weight_at(
            size,
            start_weight=self.ar_weight_start,
            end_weight=self.ar_weight_end,
            start=self.start,
            target=self.target,
            style=self.ar_weight_style,
        )

    def block_size(self, step: int) -> int:
        """B(step), eq. 3."""
        return block_size_at(
            step,
            target=self.target,
            start=self.start,
            base=self.base,
            interval=self.interval,
            warmup=self.warmup,
        )

    def ar_weight(self, step: int) -> float:
        """λ(step) = ar_weight_at(B(step))."""
        return self._ar_weight_of(self.block_size(step))

    def anneal_progress(self, step: int) -> float:
        """Progress of the annealed attention mask (``mask_kind: annealed``, masks.py) at step k.

        It follows the growth phase of eq. 3: 0 at step 1, rising linearly to 1 at
        ``growth_end_step()`` (the step at which B would reach the target), 1 after; 1 throughout
        when there is no growth. The annealed baseline trains at the target block size all along and
        anneals the mask instead of growing the block.
        """
        _check_step(step)
        end = self.growth_end_step()
        if end <= 1:
            return 1.0
        return min(1.0, max(0.0, (step - 1) / (end - 1)))

    def growth_end_step(self) -> int:
        """First step with B = target."""
        return growth_end_step(
            target=self.target,
            start=self.start,
            base=self.base,
            interval=self.interval,
            warmup=self.warmup,
        )
