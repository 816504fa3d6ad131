"""GPU-only training paths (no CPU equivalent): bf16, the distributed optimizer, megatron's clipping.

Run on a GPU machine (`pytest -m gpu`, or benchmarks/gpu_suite.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from .runs import train_in_process

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

GPU = ["--train.precision=bf16", "--model.attention_backend=flex", "--train.steps=6"]


def test_bf16_distributed_optimizer_trains(corpus_prefix: str) -> None:
    history = train_in_process(
        corpus_prefix, *GPU, "--parallel.distributed_optimizer=true", "--optimizer.lr=3e-3"
    ).history
    losses = [r["loss"] for r in history]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


def test_distributed_optimizer_equals_the_plain_optimizer(corpus_prefix: str) -> None:
    dist_opt = train_in_process(corpus_prefix, *GPU, "--parallel.distributed_optimizer=true")
    plain = train_in_process(corpus_prefix, *GPU, "--parallel.distributed_optimizer=false")
    for a, b in zip(dist_opt.history, plain.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)


def test_megatron_grad_clipping_bounds_the_update(corpus_prefix: str) -> None:
    # A tiny clip: every step clips; the reported norm is the pre-clip norm, the loss stays finite.
    history = train_in_process(corpus_prefix, *GPU, "--optimizer.clip_grad=1e-3").history
    assert all(r["grad_norm"] > 1e-3 for r in history)
    assert all(math.isfinite(r["loss"]) for r in history)
    unclipped = train_in_process(corpus_prefix, *GPU, "--optimizer.clip_grad=0").history
    # With a 1e-3 clip the weights barely move: the loss changes far less than without clipping.
    assert abs(history[-1]["loss"] - history[0]["loss"]) < abs(
        unclipped[-1]["loss"] - unclipped[0]["loss"]
    )
