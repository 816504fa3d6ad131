"""Activation recomputation (megatron-core's recompute_granularity / method / num_layers): the same
losses and gradients as without, less memory kept for backward; bad settings name the field."""

from __future__ import annotations

import pytest
import torch

from nbdiff_megatron.errors import ConfigError
from nbdiff_megatron.kernels import nbdiff_linear_loss
from nbdiff_megatron.model.builder import build_model, nbdiff_forward

from .conftest import tiny_config

SETTINGS = {
    "none": {},
    "selective": dict(recompute_granularity="selective"),
    "full-uniform": dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
    ),
    "full-block": dict(
        recompute_granularity="full", recompute_method="block", recompute_num_layers=2
    ),
}


def _saved_bytes_and_grads(name: str) -> tuple[float, int, dict[str, torch.Tensor]]:
    cfg = tiny_config(num_layers=2, seq_length=32, **SETTINGS[name])
    model = build_model(cfg, block_size=4, seed=3)
    model.train()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 99, (2, 32), generator=gen)
    masked = torch.rand(2, 32, generator=gen) < 0.5
    x_t = torch.where(masked, torch.full_like(x0, 99), x0)
    t = torch.full((2,), 0.5)
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        hidden = nbdiff_forward(model, x_t, x0, block_size=4, return_hidden=True)
    weight = model.shared_embedding_or_output_weight()
    terms = nbdiff_linear_loss(hidden, weight, x0, masked, t, ar_weight=0.5, vocab_size=100)
    terms.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(terms.total), sum(seen.values()), grads


def test_recompute_keeps_losses_and_gradients_and_saves_memory(one_rank):
    results = {name: _saved_bytes_and_grads(name) for name in SETTINGS}
    loss0, bytes0, grads0 = results["none"]
    for name, (loss, _, grads) in results.items():
        assert loss == pytest.approx(loss0, abs=1e-6), name
        assert grads.keys() == grads0.keys(), name
        for key in grads0:
            torch.testing.assert_close(grads[key], grads0[key], rtol=1e-5, atol=1e-6)
    # Memory kept for backward by the model's forward (bytes of the saved tensors' storages).
    assert results["selective"][1] < bytes0
    assert results["full-uniform"][1] < results["selective"][1]
    assert results["full-block"][1] < results["selective"][1]


@pytest.mark.parametrize(
    ("values", "field"),
    [
        (dict(recompute_granularity="partial"), "model.recompute_granularity"),
        (dict(recompute_granularity="full"), "model.recompute_method"),
        (
            dict(recompute_granularity="full", recompute_method="uniform"),
            "model.recompute_num_layers",
        ),
        (
            dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=3),
            "model.recompute_num_layers",
        ),
        (
            dict(recompute_granularity="selective", recompute_num_layers=1),
            "model.recompute_method / model.recompute_num_layers",
        ),
    ],
)
def test_bad_recompute_settings_name_the_field(values, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        tiny_config(**values).validate()
