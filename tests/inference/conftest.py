"""Tiny random NBDiff models for the inference tests (built once per module; CPU, fp32)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 48  # the tests use MASK_ID = VOCAB - 1 and EOS_ID = 0


def build_tiny(seq_length: int = 64, *, seed: int = 0, std: float = 0.3, **fields):
    """A 2-layer, hidden-64 model; a large init std makes its predictions peaked (thresholds matter)."""
    from nbdiff_megatron.model.builder import build_model
    from nbdiff_megatron.model.config import ModelConfig

    cfg = ModelConfig(
        vocab_size=VOCAB,
        seq_length=seq_length,
        init_method_std=std,
        attention_backend="sdpa",
        **fields,
    )
    model = build_model(cfg, seed=seed)
    model.eval()
    return model


@pytest.fixture(scope="package")
def tiny_model():
    return build_tiny()


@pytest.fixture(scope="package")
def gqa_model():
    return build_tiny(num_query_groups=2, qk_layernorm=True, seed=1)


@pytest.fixture(scope="package")
def tiny_model_fp64():
    """`tiny_model`'s weights in fp64: equality checks free of fp32 summation-order noise."""
    import torch

    return build_tiny().to(torch.float64)
