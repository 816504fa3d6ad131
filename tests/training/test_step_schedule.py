"""A config builds what it describes: B, λ and LR at step k come from `cfg.step_schedule()`."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbdiff_megatron.errors import ConfigError
from nbdiff_megatron.method.curriculum import ar_weight_at, block_size_at
from nbdiff_megatron.method.schedules import lr_at
from nbdiff_megatron.training.config import check_world_size, load_config

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.yaml"
GROWTH = [
    "--train.steps=40",
    "--curriculum.start_block_size=1",
    "--curriculum.target_block_size=8",
    "--curriculum.growth_interval=5",
    "--curriculum.growth_warmup=2",
    "--curriculum.ar_weight=0.6",
    "--curriculum.ar_weight_final=0.2",
    "--curriculum.ar_weight_anneal=linear",
    "--optimizer.lr=1e-3",
    "--optimizer.min_lr=1e-4",
    "--schedule.warmup_steps=4",
    "--schedule.decay_steps=10",
]


def test_the_step_schedule_is_the_equations_with_the_config_values() -> None:
    schedule = load_config(TINY, GROWTH).step_schedule()
    for k in (1, 6, 7, 12, 17, 22, 40):
        size = block_size_at(k, target=8, start=1, base=2, interval=5, warmup=2)
        assert schedule.block_size(k) == size
        expected_weight = ar_weight_at(
            size, start_weight=0.6, end_weight=0.2, start=1, target=8, style="linear"
        )
        assert schedule.ar_weight(k) == pytest.approx(expected_weight)
        assert schedule.lr(k) == pytest.approx(
            lr_at(k, peak=1e-3, min_lr=1e-4, warmup=4, total=40, decay=10, style="wsd")
        )
        assert schedule.anneal_progress(k) is None
    assert schedule.curriculum.growth_end_step() == 2 + 3 * 5


def test_the_annealed_baseline_trains_at_the_target_and_anneals_the_mask() -> None:
    schedule = load_config(TINY, [*GROWTH, "--curriculum.mask_kind=annealed"]).step_schedule()
    end = schedule.curriculum.growth_end_step()
    assert [schedule.block_size(k) for k in (1, 10, end, 40)] == [8, 8, 8, 8]
    assert schedule.anneal_progress(1) == 0.0 and schedule.anneal_progress(end) == 1.0
    assert 0.0 < schedule.anneal_progress(end // 2) < 1.0
    # λ keeps its co-schedule with the growth phase the mask anneals over.
    assert schedule.ar_weight(1) == pytest.approx(0.6) and schedule.ar_weight(end) == pytest.approx(
        0.2
    )


def test_validation_reports_every_problem_at_once() -> None:
    # Before: the spike checks raised on the first one, dropping the problems collected so far.
    with pytest.raises(ConfigError) as caught:
        load_config(
            TINY,
            [
                "--optimizer.lr=-1",
                "--faults.spike_factor=0.5",
                "--faults.spike_window=0",
                "--faults.max_consecutive_spikes=0",
                "--curriculum.mask_kind=block_causal",
                "--curriculum.ar_weight=0.5",
            ],
        )
    items = [line[4:] for line in str(caught.value).splitlines() if line.startswith("  - ")]
    for field in (
        "optimizer.lr must be > 0",
        "faults.spike_factor must be > 1",
        "faults.spike_window must be >= 1",
        "faults.max_consecutive_spikes must be >= 1",
        "curriculum.ar_weight=0.5 (ar_weight_final=None) with curriculum.mask_kind=block_causal",
    ):
        assert any(item.startswith(field) for item in items), (field, items)
    assert f"{len(items)} problems in the config" in str(caught.value)


def test_the_launch_check_reports_the_data_parallel_size_and_the_batch_together() -> None:
    overrides = ["--parallel.dp=3", "--train.global_batch_size=5", "--train.micro_batch_size=1"]
    cfg = load_config(TINY, overrides, validate=False)
    with pytest.raises(ConfigError) as caught:
        check_world_size(cfg, 2)
    problems = caught.value.problems
    assert any("parallel.dp=3" in message for message in problems), problems
    assert any("train.global_batch_size=5" in message for message in problems), problems
