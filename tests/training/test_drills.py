"""Fault drills are read from the environment once, at the start of a run, and handed to the step and
the saves (faults.Drills): the step reads no environment variable."""

from __future__ import annotations

import math
import os

import pytest

from nbdiff_megatron.training.faults import NO_DRILLS, Drills
from tests.launch import DIST_VARS

from .runs import TINY, tiny_overrides


def test_drills_parse_the_environment_given() -> None:
    drills = Drills.from_env(
        {
            "NBDIFF_FAULT_NAN_STEPS": "3, 4,",
            "NBDIFF_FAULT_KILL_IN_SAVE": "6",
            "NBDIFF_FAULT_SPIKE_STEPS": " ",
            "NBDIFF_FAULT_KILL_AFTER_STEP": "5",
        }
    )
    assert drills.nan_loss_steps == {3, 4}
    assert drills.kill_in_save_steps == {6}
    assert drills.kill_after_steps == {5}
    assert drills.spike_steps == drills.nan_grad_steps == drills.kill_in_write_steps == set()
    assert Drills.from_env({}) == NO_DRILLS


def test_the_step_runs_the_drills_it_was_given_not_the_environment(
    corpus_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbdiff_megatron.model.parallel import destroy_parallel
    from nbdiff_megatron.training.config import load_config
    from nbdiff_megatron.training.setup import build_components, data_iterator
    from nbdiff_megatron.training.step import TrainStep

    cfg = load_config(TINY, tiny_overrides(corpus_prefix, "--checkpoint.save=null"))
    for name in DIST_VARS:
        os.environ.pop(name, None)
    try:
        parts = build_components(cfg, "nbdiff")
        batches = data_iterator(parts.cfg, parts.dataset, parts.place, consumed_samples=0)
        step = TrainStep.build(parts, batches, Drills(nan_loss_steps=frozenset({2})))
        # Set after the drills were read: the step must not see it.
        monkeypatch.setenv("NBDIFF_FAULT_NAN_STEPS", "1")
        first, second = step(1), step(2)
        parts.release()
    finally:
        destroy_parallel()
        for name in DIST_VARS:
            os.environ.pop(name, None)
    assert math.isfinite(float(first.terms[0])) and first.grad_norm is not None
    assert math.isnan(float(second.terms[0])) and second.grad_norm is None
