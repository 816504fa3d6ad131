"""The loading rule between layer implementations (model.transformer_impl): a checkpoint that lacks
`_extra_state` entries (Transformer Engine's FP8 metadata; a converted checkpoint is written from the
local spec) loads; a checkpoint that lacks a tensor does not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nbdiff_megatron.checkpoint import mcore_io
from nbdiff_megatron.errors import CheckpointError
from nbdiff_megatron.model.builder import build_model
from nbdiff_megatron.training import checkpointing

from .conftest import tiny_config


class WithExtraState(torch.nn.Module):
    """A module keeping extra state, as a TE layer does."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3))
        self.meta = "fresh"

    def get_extra_state(self) -> str:
        return self.meta

    def set_extra_state(self, state: str) -> None:
        self.meta = state


def test_absent_extra_state_loads_and_absent_tensors_do_not() -> None:
    te_like = torch.nn.Sequential(WithExtraState())
    plain = {"0.weight": torch.ones(3)}  # what a checkpoint of the other implementation holds
    with pytest.raises(RuntimeError, match="_extra_state"):
        te_like.load_state_dict(plain, strict=True)  # the strict load of before
    mcore_io.load_model_state_dict(te_like, plain)
    assert torch.equal(te_like[0].weight, torch.ones(3)) and te_like[0].meta == "fresh"
    with pytest.raises(RuntimeError, match="model.transformer_impl"):
        mcore_io.load_model_state_dict(te_like, {})
    with pytest.raises(RuntimeError, match="unexpected keys"):
        mcore_io.load_model_state_dict(te_like, {**plain, "0.bias": torch.ones(3)})


def _save_without(model: torch.nn.Module, path: Path, drop) -> None:  # noqa: ANN001
    from megatron.core import dist_checkpointing

    sharded = {k: v for k, v in model.sharded_state_dict().items() if not drop(k)}
    path.mkdir()
    dist_checkpointing.save({"model": sharded}, str(path))


def test_a_checkpoint_without_extra_state_entries_loads(one_rank, tmp_path: Path) -> None:
    cfg = tiny_config()
    source = build_model(cfg, seed=3)
    assert any(mcore_io.is_extra_state_key(k) for k in source.sharded_state_dict())
    _save_without(source, tmp_path / "no_extra", mcore_io.is_extra_state_key)
    target = build_model(cfg, seed=4)
    checkpointing.load_checkpoint(str(tmp_path / "no_extra"), [target], None, weights_only=True)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    # A tensor the checkpoint lacks is still an error.
    _save_without(source, tmp_path / "no_norm", lambda k: k == "decoder.final_layernorm.weight")
    with pytest.raises(CheckpointError, match="final_layernorm"):
        checkpointing.load_checkpoint(str(tmp_path / "no_norm"), [target], None, weights_only=True)
