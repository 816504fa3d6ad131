"""Shared helpers of the model tests: a tiny model config (`one_rank` is in tests/conftest.py)."""

from __future__ import annotations

from nbdiff_megatron.model.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """2 layers, hidden 64, 4 heads in 2 query groups, vocab 100, L = 16."""
    values = dict(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=100,
        seq_length=16,
        attention_backend="sdpa",
    )
    values.update(overrides)
    return ModelConfig(**values)
