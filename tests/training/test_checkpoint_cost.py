"""`nbdiff plan`'s checkpoint size and save cost (issue 22 §5), against a built model's parameters."""

from __future__ import annotations

import pytest

from nbdiff_megatron.training.checkpoint_cost import (
    FS_WRITE_GBPS,
    HOST_COPY_GBPS,
    checkpoint_cost,
)
from nbdiff_megatron.training.config import load_config
from nbdiff_megatron.training.plan import plan_report

from .runs import TINY

SHAPE = ["--model.vocab_size=4096", "--model.num_layers=2", "--model.hidden_size=64"]


def _model_parameters(cfg) -> int:
    from nbdiff_megatron.model.builder import build_model
    from nbdiff_megatron.model.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(1, 1, 1)
    try:
        model = build_model(cfg.model, block_size=2, seed=1)
        return sum(p.numel() for p in model.parameters())
    finally:
        destroy_parallel()


def test_checkpoint_size_is_the_models_parameters_in_the_saved_dtypes() -> None:
    fp32 = load_config(TINY, [*SHAPE, "--train.precision=fp32", "--parallel.dp=2"])
    params = _model_parameters(fp32)
    cost = checkpoint_cost(fp32)
    assert cost.weights_bytes == 4 * params  # fp32 weights
    assert cost.optimizer_bytes == 12 * params  # dist-opt: fp32 main weights + 2 Adam moments
    plain = checkpoint_cost(load_config(TINY, [*SHAPE, "--parallel.distributed_optimizer=false"]))
    assert plain.optimizer_bytes == 8 * params  # the two moments (the main weights are the model's)
    bf16 = checkpoint_cost(load_config(TINY, [*SHAPE, "--train.precision=bf16"]))
    assert bf16.weights_bytes == 2 * params and bf16.optimizer_bytes == 12 * params
    assert cost.sync_seconds() == pytest.approx(16 * params / (FS_WRITE_GBPS * 1e9))
    assert cost.async_seconds() == pytest.approx(16 * params / 2 / (HOST_COPY_GBPS * 1e9))


def test_plan_prints_the_checkpoint_size_and_the_save_time_sync_and_async() -> None:
    text, _ = plan_report(load_config("examples/phase1_8k.yaml", []))
    line = next(ln for ln in text.splitlines() if ln.startswith("checkpoint: "))
    assert "weights" in line and "optimizer" in line and "every" in line
    assert f"at {FS_WRITE_GBPS:g} GB/s file-system writes: sync" in text
    assert "async (checkpoint.async_save)" in text
