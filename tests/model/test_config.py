"""ModelConfig validation and the megatron-core TransformerConfig it produces."""

from __future__ import annotations

import pytest
import torch

from nbdiff_megatron.errors import ConfigError
from nbdiff_megatron.model.builder import build_model
from nbdiff_megatron.model.config import ModelConfig

from .conftest import tiny_config


def test_defaults_build_a_transformer_config():
    cfg = ModelConfig(vocab_size=100, num_query_groups=2)
    tc = cfg.to_transformer_config(tp=2)
    assert tc.normalization == "RMSNorm"
    assert tc.gated_linear_unit and tc.activation_func is torch.nn.functional.silu
    assert tc.add_bias_linear is False
    assert tc.num_query_groups == 2 and tc.kv_channels == 16
    assert tc.tensor_model_parallel_size == 2
    if not torch.cuda.is_available():
        assert tc.use_cpu_initialization and tc.batch_p2p_sync is False
        assert tc.params_dtype == torch.float32


def test_padded_vocab_is_a_multiple_of_divisor_times_tp():
    cfg = ModelConfig(vocab_size=100)
    assert cfg.padded_vocab_size(1) == 128
    assert cfg.padded_vocab_size(2) == 256
    assert ModelConfig(vocab_size=129).padded_vocab_size(1) == 256


@pytest.mark.parametrize(
    ("fields", "tp", "pp", "needle"),
    [
        (
            dict(num_attention_heads=3, hidden_size=48, num_query_groups=None),
            2,
            1,
            "model.num_attention_heads",
        ),
        (dict(num_query_groups=1), 2, 1, "model.num_query_groups"),
        (dict(num_layers=3), 1, 2, "model.num_layers"),
        (dict(attention_backend="xformers"), 1, 1, "model.attention_backend"),
        (dict(params_dtype="fp8"), 1, 1, "model.params_dtype"),
        (dict(vocab_size=0), 1, 1, "model.vocab_size"),
        (dict(hidden_size=66), 1, 1, "model.hidden_size"),
        (dict(rope_scaling={"type": "yarn", "factor": 4}), 1, 1, "model.rope_scaling"),
    ],
)
def test_bad_fields_are_named(fields, tp, pp, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        tiny_config(**fields).validate(tp=tp, pp=pp)


def test_block_larger_than_sequence_fails_at_build(one_rank):
    with pytest.raises(ConfigError, match="block_size=32.*model.seq_length=16"):
        build_model(tiny_config(), block_size=32)


def test_unknown_backend_fails_at_build(one_rank):
    with pytest.raises(ConfigError, match=r"model\.attention_backend='xformers'"):
        build_model(tiny_config(attention_backend="xformers"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only rule")
def test_flex_backend_refused_for_cpu_training(one_rank):
    with pytest.raises(ConfigError, match=r"model\.attention_backend='flex'"):
        build_model(tiny_config(attention_backend="flex"))


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="hiden_size"):
        ModelConfig.from_dict({"hiden_size": 64})
    cfg = ModelConfig.from_dict(tiny_config().to_dict())
    assert cfg == tiny_config()
