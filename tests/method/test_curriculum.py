"""Block growth (docs/METHOD.md eq. 3) and its co-schedules."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdiff_megatron.method.curriculum import (
    Curriculum,
    ar_weight_at,
    block_size_at,
    growth_end_step,
    interval_to_finish_by,
)

FAST = settings(max_examples=80, deadline=None)


# Paper (docs/METHOD.md §5): target 32, 4000 iterations, growth finished by 2500. From B0 = 1 that is
# 5 doublings, so interval 500 without warm-up, or warm-up 500 and interval 400.
@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 1),
        (499, 1),
        (500, 2),
        (999, 2),
        (1000, 4),
        (1500, 8),
        (2000, 16),
        (2499, 16),
        (2500, 32),
        (3999, 32),
    ],
)
def test_block_size_paper_setting_no_warmup(step, expected):
    assert block_size_at(step, target=32, interval=500) == expected


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 1),
        (899, 1),
        (900, 2),
        (1299, 2),
        (1300, 4),
        (1700, 8),
        (2100, 16),
        (2499, 16),
        (2500, 32),
    ],
)
def test_block_size_paper_setting_with_warmup(step, expected):
    assert block_size_at(step, target=32, interval=400, warmup=500) == expected


def test_block_size_other_bases_and_targets():
    # B0 = 4, r = 4, target 48: 4, 16, 48 (capped by min), then 48.
    assert [block_size_at(s, start=4, base=4, target=48, interval=10) for s in (0, 10, 20, 30)] == [
        4,
        16,
        48,
        48,
    ]
    # Late steps do not overflow or slow down.
    assert block_size_at(10**12, target=32, interval=1) == 32


def test_growth_end_and_interval_helpers():
    assert growth_end_step(target=32, interval=500) == 2500
    assert growth_end_step(target=32, interval=400, warmup=500) == 2500
    assert interval_to_finish_by(2500, target=32) == 500
    assert interval_to_finish_by(2500, target=32, warmup=500) == 400
    assert growth_end_step(target=4, start=4, interval=7) == 0


@FAST
@given(
    start_exp=st.integers(0, 3),
    extra=st.integers(0, 40),
    base=st.integers(2, 4),
    interval=st.integers(1, 50),
    warmup=st.integers(0, 50),
)
def test_block_size_never_decreases_and_reaches_target(start_exp, extra, base, interval, warmup):
    start = 2**start_exp
    target = start + extra
    kwargs = dict(target=target, start=start, base=base, interval=interval, warmup=warmup)
    end = growth_end_step(**kwargs)
    sizes = [block_size_at(s, **kwargs) for s in range(end + interval + 1)]
    assert sizes[0] == start
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert sizes[end] == target and (end == 0 or sizes[end - 1] < target)
    assert all(start <= b <= target for b in sizes)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"interval": 0}, "interval"),
        ({"interval": -5}, "interval"),
        ({"interval": 10, "target": 2, "start": 4}, "target"),
        ({"interval": 10, "base": 1}, "base"),
        ({"interval": 10, "start": 0}, "start"),
        ({"interval": 10, "warmup": -1}, "warmup"),
        ({"interval": 10, "step": -1}, "step"),
        ({"interval": 2.5}, "interval"),
    ],
)
def test_block_size_bad_arguments(kwargs, name):
    step = kwargs.pop("step", 0)
    with pytest.raises(ValueError, match=name):
        block_size_at(step, **kwargs)


def test_ar_weight_hand_cases():
    assert ar_weight_at(8) == 0.5  # project default: constant 0.5
    # linear in log2(B): B = 4 of 1 -> 32 is 2/5 of the way.
    assert ar_weight_at(1, start_weight=0.5, end_weight=0.1, style="linear") == pytest.approx(0.5)
    assert ar_weight_at(4, start_weight=0.5, end_weight=0.1, style="linear") == pytest.approx(0.34)
    assert ar_weight_at(32, start_weight=0.5, end_weight=0.1, style="linear") == pytest.approx(0.1)
    # cosine: halfway (B = 4 of 1 -> 16) is the mean;
    # a quarter (B = 2) is 0.1 + 0.4 (1 + cos(π/4)) / 2.
    assert ar_weight_at(
        4, start_weight=0.5, end_weight=0.1, target=16, style="cosine"
    ) == pytest.approx(0.3)
    quarter = 0.1 + 0.4 * (1 + math.cos(math.pi / 4)) / 2
    assert ar_weight_at(
        2, start_weight=0.5, end_weight=0.1, target=16, style="cosine"
    ) == pytest.approx(quarter)
    assert ar_weight_at(
        16, start_weight=0.5, end_weight=0.1, target=16, style="cosine"
    ) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"block_size": 64}, "block_size"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 4, "style": "step"}, "style"),
        ({"block_size": 4, "start_weight": 1.5}, "start_weight"),
        ({"block_size": 4, "end_weight": -0.1}, "end_weight"),
    ],
)
def test_ar_weight_bad_arguments(kwargs, name):
    size = kwargs.pop("block_size")
    with pytest.raises(ValueError, match=name):
        ar_weight_at(size, **kwargs)


def test_curriculum_bundles_the_schedules():
    cur = Curriculum(
        interval=500,
        ar_weight_start=0.5,
        ar_weight_end=0.1,
        ar_weight_style="linear",
    )
    assert [cur.block_size(s) for s in (0, 500, 1000, 2500)] == [1, 2, 4, 32]
    assert cur.ar_weight(1000) == pytest.approx(0.34)
    assert cur.ar_weight(3000) == pytest.approx(0.1)
    assert cur.growth_end_step() == 2500
    with pytest.raises(dataclasses.FrozenInstanceError):
        cur.target = 64  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"interval": 0}, "interval"),
        ({"target": 0}, "target"),
        ({"base": 1}, "base"),
        ({"warmup": -2}, "warmup"),
        ({"ar_weight_style": "exp"}, "style"),
        ({"ar_weight_end": 2.0}, "end_weight"),
    ],
)
def test_curriculum_validates_on_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Curriculum(**kwargs)


def test_no_refinement_step_co_schedule_in_the_curriculum():
    # The training curriculum schedules B and λ only; the refinement steps per block are the
    # decoder's business (`nbdiff generate`), not a dead co-schedule here (issue 11, item 4).
    import nbdiff_megatron.method.curriculum as curriculum

    assert not hasattr(curriculum, "refine_steps_at")
    assert not hasattr(Curriculum, "refine_steps")
    assert {f.name for f in dataclasses.fields(Curriculum)} == {
        "target",
        "start",
        "base",
        "interval",
        "warmup",
        "ar_weight_start",
        "ar_weight_end",
        "ar_weight_style",
    }
