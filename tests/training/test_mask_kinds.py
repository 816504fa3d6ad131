"""Which mask kinds train with which losses (docs/METHOD.md), and the annealed baseline in the loop."""

from __future__ import annotations

import math

import pytest

from nbdiff_megatron.errors import ConfigError
from nbdiff_megatron.training.config import load_config

from .runs import TINY, train_in_process


@pytest.mark.parametrize(
    "extra",
    [
        ["--curriculum.ar_weight=0.5"],
        # λ 0 at the start but > 0 later in its schedule: still a copy task at those steps
        [
            "--curriculum.ar_weight=0.0",
            "--curriculum.ar_weight_final=0.2",
            "--curriculum.ar_weight_anneal=linear",
        ],
    ],
)
def test_block_causal_with_an_ar_loss_is_rejected(extra):
    with pytest.raises(ConfigError, match=r"curriculum\.ar_weight.*copy task"):
        load_config(TINY, ["--curriculum.mask_kind=block_causal", *extra])


def test_the_combinations_that_train():
    load_config(TINY, ["--curriculum.mask_kind=block_causal", "--curriculum.ar_weight=0"])
    # B = 1 throughout: block-causal is causal, the AR loss is a real next-token loss.
    load_config(TINY, ["--curriculum.mask_kind=block_causal", "--curriculum.target_block_size=1"])
    for kind in ("context_causal", "annealed"):
        load_config(TINY, [f"--curriculum.mask_kind={kind}", "--curriculum.ar_weight=0.5"])


def test_annealed_mask_trains_at_the_target_block_size_with_scheduled_progress(corpus_prefix):
    result = train_in_process(
        corpus_prefix,
        "--train.steps=4",
        "--curriculum.mask_kind=annealed",
        "--curriculum.ar_weight=0.0",
        "--curriculum.target_block_size=4",
        "--curriculum.growth_warmup=0",
        "--curriculum.growth_interval=2",  # B would reach 4 at step 4: progress 0 -> 1 over 1..4
    )
    history = result.history
    assert [r["block_size"] for r in history] == [4, 4, 4, 4]
    assert [r["mask_kind"] for r in history] == ["annealed"] * 4
    assert [r["anneal_progress"] for r in history] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert all(math.isfinite(r["loss"]) and r["mdm"] > 0 for r in history)
    assert [r["ar_weight"] for r in history] == [0.0] * 4
