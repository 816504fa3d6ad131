"""train(objective="ar"): the same model trained as a plain causal LM (the train-step benchmark's baseline)."""

from __future__ import annotations

import math

import pytest

from nbdiff_megatron.errors import ConfigError

from .runs import TINY, plain_causal_loss, tiny_overrides, train_in_process


@pytest.mark.parametrize("fused", [True, False], ids=["fused-loss", "reference-loss"])
def test_ar_step_is_a_direct_causal_forward_and_cross_entropy(
    corpus_prefix: str, fused: bool
) -> None:
    # Target B = 8 and λ = 0.5 (the tiny config's NBDiff settings): the AR objective ignores both.
    extra = [
        "--train.steps=6" if fused else "--train.steps=1",
        f"--loss.fused={str(fused).lower()}",
    ]
    result = train_in_process(corpus_prefix, *extra, objective="ar")
    first = result.history[0]
    plain = plain_causal_loss(corpus_prefix, *extra)
    assert first["loss"] == pytest.approx(plain, abs=1e-5)
    assert first["ar"] == pytest.approx(plain, abs=1e-5)
    assert first["mdm"] == 0.0 and first["block_size"] == 1 and first["ar_weight"] == 1.0
    if fused:
        losses = [r["loss"] for r in result.history]
        assert all(math.isfinite(x) for x in losses) and not any(
            r["skipped"] for r in result.history
        )
        assert losses[-1] < losses[0] - 0.5, losses
        # The NBDiff step at B = 1 and λ = 1 (token shift: nothing masked) optimises the same loss
        # on a 2L forward: same losses and gradient norms, step after step.
        nbdiff = train_in_process(
            corpus_prefix,
            "--train.steps=3",
            "--curriculum.start_block_size=1",
            "--curriculum.target_block_size=1",
            "--curriculum.ar_weight=1.0",
        )
        for ar_step, nb_step in zip(result.history[:3], nbdiff.history, strict=True):
            assert ar_step["loss"] == pytest.approx(nb_step["loss"], abs=1e-5)
            assert ar_step["grad_norm"] == pytest.approx(nb_step["grad_norm"], rel=1e-4)


def test_ar_objective_rejects_what_it_cannot_run(corpus_prefix: str, tmp_path) -> None:
    from nbdiff_megatron.training.config import load_config
    from nbdiff_megatron.training.setup import check_objective

    cfg = load_config(TINY, tiny_overrides(corpus_prefix))
    check_objective(cfg, "nbdiff")
    check_objective(cfg, "ar")
    with pytest.raises(ConfigError, match=r"objective='causal' is unknown: use one of nbdiff, ar"):
        check_objective(cfg, "causal")
    saving = load_config(TINY, tiny_overrides(corpus_prefix, f"--checkpoint.save={tmp_path}"))
    with pytest.raises(ConfigError, match=r"--checkpoint.save=null"):
        check_objective(saving, "ar")
    check_objective(saving, "nbdiff")
    cp2 = load_config(TINY, tiny_overrides(corpus_prefix, "--parallel.cp=2"), validate=False)
    with pytest.raises(ConfigError, match=r"parallel.cp=1 only \(got 2\)"):
        check_objective(cp2, "ar")
