"""Shared fixtures of the model tests: a 1-rank gloo process group and a tiny model config."""

from __future__ import annotations

import pytest
import torch

from nbdiff_megatron.model.config import ModelConfig


@pytest.fixture(scope="session")
def one_rank():
    """megatron-core parallel_state with TP = PP = CP = 1 on a 1-process gloo group."""
    from megatron.core import parallel_state

    from nbdiff_megatron.model.parallel import initialize_parallel

    torch.set_num_threads(1)
    if not (parallel_state.model_parallel_is_initialized()
            and parallel_state.get_tensor_model_parallel_world_size() == 1
            and parallel_state.get_pipeline_model_parallel_world_size() == 1):
        initialize_parallel(1, 1, 1, seed=1234)
    yield


def tiny_config(**overrides) -> ModelConfig:
    """2 layers, hidden 64, 4 heads in 2 query groups, vocab 100, L = 16."""
    values = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                  num_query_groups=2, vocab_size=100, seq_length=16, attention_backend="sdpa")
    values.update(overrides)
    return ModelConfig(**values)
