"""Learning-rate schedules (docs/METHOD.md §6: constant then cooled down / WSD; cosine; constant)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdiff_megatron.method.schedules import LRSchedule, lr_at

FAST = settings(max_examples=80, deadline=None)

# peak 1, min 0.1, warm-up 10, 100 steps, the last 20 cool down (from step 80 to step 100).
WSD = dict(peak=1.0, min_lr=0.1, warmup=10, total=100, decay=20)


@pytest.mark.parametrize(
    "step, shape, expected",
    [
        (0, "linear", 0.0),
        (5, "linear", 0.5),
        (10, "linear", 1.0),
        (79, "linear", 1.0),
        (80, "linear", 1.0),
        (85, "linear", 0.1 + 0.9 * 0.75),
        (90, "linear", 0.55),
        (85, "cosine", 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),
        (85, "1-sqrt", 0.1 + 0.9 * 0.5),
        (100, "linear", 0.1),
        (100, "cosine", 0.1),
        (100, "1-sqrt", 0.1),
        (150, "linear", 0.1),
    ],
)
def test_wsd_hand_cases(step, shape, expected):
    assert lr_at(step, **WSD, decay_shape=shape) == pytest.approx(expected, abs=1e-12)


def test_cosine_and_constant_hand_cases():
    kw = dict(peak=1.0, min_lr=0.1, warmup=10, total=110, decay=0)
    assert lr_at(5, **kw, style="cosine") == pytest.approx(0.5)
    assert lr_at(10, **kw, style="cosine") == pytest.approx(1.0)
    assert lr_at(35, **kw, style="cosine") == pytest.approx(
        0.1 + 0.45 * (1 + math.cos(math.pi / 4))
    )
    assert lr_at(60, **kw, style="cosine") == pytest.approx(0.55)
    assert lr_at(110, **kw, style="cosine") == pytest.approx(0.1)
    assert lr_at(500, **kw, style="cosine") == pytest.approx(0.1)
    assert lr_at(5, **kw, style="constant") == pytest.approx(0.5)
    assert lr_at(10**6, **kw, style="constant") == 1.0


def test_wsd_without_cooldown_stays_at_peak():
    assert lr_at(100, peak=2.0, min_lr=0.0, warmup=0, total=100, decay=0) == 2.0


@st.composite
def schedules(draw):
    total = draw(st.integers(1, 300))
    warmup = draw(st.integers(0, total))
    decay = draw(st.integers(0, total - warmup))
    peak = draw(st.floats(1e-6, 1.0))
    min_lr = draw(st.floats(0.0, 1.0)) * peak
    style = draw(
        st.sampled_from(["wsd", "cosine", "constant"] if warmup < total else ["wsd", "constant"])
    )
    shape = draw(st.sampled_from(["linear", "cosine", "1-sqrt"]))
    return dict(
        peak=peak,
        min_lr=min_lr,
        warmup=warmup,
        total=total,
        decay=decay,
        style=style,
        decay_shape=shape,
    )


@FAST
@given(kw=schedules())
def test_schedule_properties(kw):
    lrs = [lr_at(s, **kw) for s in range(kw["total"] + 5)]
    peak, min_lr, warmup, total = kw["peak"], kw["min_lr"], kw["warmup"], kw["total"]
    tol = 1e-12 * peak
    assert all(-tol <= lr <= peak + tol for lr in lrs)
    assert all(a <= b + tol for a, b in zip(lrs[:warmup], lrs[1 : warmup + 1])), "warm-up rises"
    assert lrs[warmup] == pytest.approx(peak), "peak right after the warm-up"
    if kw["style"] in ("wsd", "cosine"):
        after = lrs[warmup:]
        assert all(b <= a + tol for a, b in zip(after, after[1:])), (
            "non-increasing after the warm-up"
        )
    if kw["style"] == "cosine" or (kw["style"] == "wsd" and kw["decay"] > 0):
        assert lrs[total] == pytest.approx(min_lr, abs=tol), "min_lr at the end"


@pytest.mark.parametrize(
    "change, name",
    [
        ({"style": "linear"}, "style"),
        ({"decay_shape": "exp"}, "decay_shape"),
        ({"step": -1}, "step"),
        ({"peak": 0.0}, "peak"),
        ({"min_lr": 2.0}, "min_lr"),
        ({"min_lr": -0.1}, "min_lr"),
        ({"total": 0}, "total"),
        ({"warmup": 200}, "warmup"),
        ({"warmup": -1}, "warmup"),
        ({"decay": -1}, "decay"),
        ({"style": "cosine", "warmup": 100}, "warmup < total"),
        ({"warmup": 90, "decay": 20}, "decay"),
    ],
)
def test_bad_arguments(change, name):
    kw = dict(WSD) | change
    step = kw.pop("step", 0)
    with pytest.raises(ValueError, match=name):
        lr_at(step, **kw)


def test_lr_schedule_dataclass():
    sched = LRSchedule(**WSD)
    assert sched.at(90) == pytest.approx(0.55)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sched.peak = 2.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="decay"):
        LRSchedule(peak=1.0, warmup=5, total=10, decay=6)
