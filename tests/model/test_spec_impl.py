"""The layer implementation (model.transformer_impl) and the norms it builds, on any device.

- The sequence-parallel patch of the local spec's torch norms is applied whenever the local spec is
  built, also with CUDA present (a GPU without Transformer Engine runs the local spec).
- The decoder's final norm follows the layers' implementation, never megatron-core's import-time
  pick (apex's FusedLayerNorm has no RMSNorm).
- `transformer_impl` is validated and a missing TE is a ConfigError naming the field.
- GPU + TE only: the TE spec with our attention and QK-norm computes what the local spec computes.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from nbdiff_megatron.errors import ConfigError
from nbdiff_megatron.model import builder, spec
from nbdiff_megatron.model.builder import build_model
from nbdiff_megatron.model.spec import HAVE_TE, nbdiff_layer_spec, uses_transformer_engine

from .conftest import tiny_config


def _unpatched_torch_norm(monkeypatch: pytest.MonkeyPatch) -> type:
    """megatron-core's WrappedTorchNorm as shipped (this test's changes undone afterwards)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    original = getattr(WrappedTorchNorm, "_nbdiff_orig___new__", None)
    if original is not None:
        monkeypatch.setattr(WrappedTorchNorm, "__new__", original)
        monkeypatch.delattr(WrappedTorchNorm, "_nbdiff_orig___new__")
    return WrappedTorchNorm


def _sequence_parallel_config() -> object:
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=1,
        normalization="RMSNorm",
        use_cpu_initialization=True,
    )
    config.sequence_parallel = True  # as at TP > 1 (the config refuses it at TP = 1)
    return config


def test_local_spec_allows_sequence_parallel_torch_norms_with_cuda_present(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    norm_cls = _unpatched_torch_norm(monkeypatch)
    config = _sequence_parallel_config()
    with pytest.raises(AssertionError, match="sequence parallel"):
        norm_cls(config, 8, eps=1e-6)  # megatron-core's own refusal, as on a GPU without TE
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    nbdiff_layer_spec(use_transformer_engine=False)
    norm = norm_cls(config, 8, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm)
    # Its gradient is partial under SP: tagged for finalize_model_grads' all-reduce over TP.
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())


def test_final_norm_follows_the_local_layers_not_megatron_import_time_pick(
    one_rank, monkeypatch: pytest.MonkeyPatch
) -> None:
    from megatron.core.transformer import transformer_block

    class AssertingFusedNorm(torch.nn.Module):
        """Stands in for apex's FusedLayerNorm, which megatron-core picks when apex imports
        without TE, and which asserts on RMSNorm (and without apex kernels)."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("FusedLayerNorm does not support RMSNorm")

    monkeypatch.setattr(transformer_block, "LayerNormImpl", AssertingFusedNorm)
    model = build_model(tiny_config(), seed=1, use_transformer_engine=False)
    assert type(model.decoder.final_layernorm) is torch.nn.RMSNorm
    assert type(model.decoder.layers[0].input_layernorm) is torch.nn.RMSNorm


def test_local_norms_run_in_the_training_dtype_under_bf16(one_rank) -> None:
    from nbdiff_megatron.model.builder import nbdiff_forward

    model = build_model(
        tiny_config(params_dtype="bf16", qk_layernorm=True), seed=1, use_transformer_engine=False
    )
    norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
    # input, pre-MLP, query and key norms of 2 layers, and the final norm
    assert len(norms) == 9
    assert all(p.dtype == torch.bfloat16 for n in norms for p in n.parameters())
    outputs = []
    for norm in norms:
        norm.register_forward_hook(lambda _m, _i, out: outputs.append(out.dtype))
    x0 = torch.randint(0, 99, (1, 16))
    hidden = nbdiff_forward(model, x0.masked_fill(x0 % 3 == 0, 99), x0, block_size=4)
    assert hidden.dtype == torch.bfloat16
    assert len(outputs) == 9 and set(outputs) == {torch.bfloat16}


def test_transformer_impl_is_validated_and_resolved() -> None:
    with pytest.raises(ConfigError, match="model.transformer_impl='tensorrt'"):
        tiny_config(transformer_impl="tensorrt").validate()
    assert uses_transformer_engine("local") is False
    assert uses_transformer_engine("auto") is HAVE_TE
    if not HAVE_TE:
        with pytest.raises(ConfigError, match="--model.transformer_impl=local"):
            uses_transformer_engine("transformer_engine")


@pytest.mark.skipif(HAVE_TE, reason="checks the refusal without Transformer Engine")
def test_building_the_te_spec_without_te_names_the_field(one_rank) -> None:
    with pytest.raises(ConfigError, match="model.transformer_impl=transformer_engine"):
        build_model(tiny_config(transformer_impl="transformer_engine"), seed=1)


def test_an_unknown_gpt_model_argument_with_a_setting_is_an_error() -> None:
    # An installed megatron-core whose GPTModel lacks rope_scaling (issue 21): the Llama-3 scaling
    # of a config would be lost silently.
    def gpt_model_init(self, config, vocab_size, rotary_base=10000):  # noqa: ANN001, ANN202
        return None

    assert "rope_scaling" not in inspect.signature(gpt_model_init).parameters
    with pytest.raises(ConfigError, match="rope_scaling=True"):
        builder._filtered_kwargs(gpt_model_init, {"vocab_size": 8, "rope_scaling": True})
    # Its "off" value changes nothing: left out.
    kept = builder._filtered_kwargs(
        gpt_model_init, {"vocab_size": 8, "rope_scaling": False, "rope_scaling_factor": 8.0}
    )
    assert kept == {"vocab_size": 8}


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TE), reason="needs CUDA and TE")
@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_te_spec_with_nbdiff_attention_matches_the_local_spec(
    one_rank, qk_layernorm: bool, tmp_path
) -> None:
    from megatron.core import dist_checkpointing

    from nbdiff_megatron.model.builder import nbdiff_forward
    from nbdiff_megatron.training import checkpointing

    cfg = tiny_config(qk_layernorm=qk_layernorm)
    local = build_model(cfg, seed=3, use_transformer_engine=False).eval()
    te = build_model(cfg, seed=5, use_transformer_engine=True).eval()
    assert spec.uses_transformer_engine("transformer_engine")
    assert type(te.decoder.final_layernorm).__name__ != "RMSNorm"  # TE's norm, not torch's
    # The local model's weights through a checkpoint, as a converted checkpoint reaches TE.
    dist_checkpointing.save({"model": local.sharded_state_dict()}, str(tmp_path))
    checkpointing.load_checkpoint(str(tmp_path), [te], None, weights_only=True)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 100, (2, 16), generator=gen).cuda()
    x_t = torch.where(torch.rand(2, 16, generator=gen).cuda() < 0.5, 99, x0)
    with torch.no_grad():
        want = nbdiff_forward(local, x_t, x0, block_size=4, backend="sdpa")
        got = nbdiff_forward(te, x_t, x0, block_size=4, backend="sdpa")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
