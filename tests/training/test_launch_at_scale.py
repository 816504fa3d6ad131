"""Launch at scale: the collective timeout reaches torch.distributed and megatron's groups, and
`nbdiff build-index` builds the index cache that a later `nbdiff train` only loads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from nbdiff_megatron.cli import main as nbdiff
from nbdiff_megatron.errors import ConfigError
from nbdiff_megatron.training.config import load_config
from tests.launch import DIST_VARS
from tests.training.runs import TINY, tiny_overrides, train_in_process


def _group_timeout_minutes(group: object) -> float:
    options = group._get_backend(torch.device("cpu")).options  # type: ignore[attr-defined]
    return options._timeout.total_seconds() / 60


def test_nccl_timeout_reaches_the_default_group_and_megatrons_groups(corpus_prefix: str) -> None:
    from megatron.core import parallel_state

    from nbdiff_megatron.model.parallel import destroy_parallel
    from nbdiff_megatron.training.setup import init_distributed

    cfg = load_config(TINY, tiny_overrides(corpus_prefix, "--parallel.nccl_timeout_minutes=7"))
    for name in DIST_VARS:
        os.environ.pop(name, None)
    # A default group left up by an earlier in-process test on this worker was started with another
    # timeout, and initialize_parallel keeps a group it finds: start from none.
    destroy_parallel()
    try:
        init_distributed(cfg)
        assert _group_timeout_minutes(dist.group.WORLD) == 7
        assert _group_timeout_minutes(parallel_state.get_data_parallel_group()) == 7
        assert _group_timeout_minutes(parallel_state.get_tensor_model_parallel_group()) == 7
    finally:
        destroy_parallel()
        for name in DIST_VARS:
            os.environ.pop(name, None)


def test_nccl_timeout_default_and_validation(corpus_prefix: str) -> None:
    # Longer than torch's 10-minute NCCL default, which rank 0 building the index can outlast.
    assert load_config(TINY, tiny_overrides(corpus_prefix)).parallel.nccl_timeout_minutes == 60
    with pytest.raises(ConfigError, match=r"parallel\.nccl_timeout_minutes must be >= 1"):
        load_config(TINY, tiny_overrides(corpus_prefix, "--parallel.nccl_timeout_minutes=0"))


def _cache_listing(cache: Path) -> dict[str, int]:
    return {
        str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()
    }


def test_build_index_then_train_finds_the_cache(
    corpus_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "index-cache"
    args = ("--train.steps=2", f"--data.data_cache_path={cache}")
    assert nbdiff(["build-index", "--config", TINY, *tiny_overrides(corpus_prefix, *args)]) == 0
    out = capsys.readouterr().out
    built = _cache_listing(cache)
    assert any(name.endswith("shuffle_index.npy") for name in built), built
    assert f"built {len(built)} index files in {cache}" in out, out

    assert nbdiff(["build-index", "--config", TINY, *tiny_overrides(corpus_prefix, *args)]) == 0
    assert "found the index complete" in capsys.readouterr().out
    train_in_process(corpus_prefix, *args)
    # Nothing rebuilt or added: the training run looked for exactly the index build-index wrote.
    assert _cache_listing(cache) == built
