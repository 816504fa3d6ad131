"""Two gloo ranks build the same datasets (rank 0 fills megatron's cache first) and split them."""

import json
from pathlib import Path

import pytest

from nbdiff_megatron.data.bundled import bundled_tokenizer_path
from nbdiff_megatron.data.config import DataConfig
from nbdiff_megatron.data.datasets import build_datasets
from tests.launch import run_torchrun

SCRIPT = Path(__file__).with_name("multirank_data_check.py")


@pytest.mark.multirank
def test_two_data_parallel_ranks_share_the_global_order(small_prefix, tokenizer, tmp_path):
    cache = tmp_path / "cache"
    run_torchrun(
        [SCRIPT, "--prefix", small_prefix, "--cache", cache, "--out", tmp_path],
        nproc=2,
        timeout=240,
    )
    results = [json.loads((tmp_path / f"result_{r}.json").read_text()) for r in range(2)]

    cfg = DataConfig(
        data_path=[small_prefix],
        tokenizer_model=bundled_tokenizer_path(),
        split="90,8,2",
        data_cache_path=str(tmp_path / "cache1"),
    )
    train = build_datasets(cfg, 64, tokenizer, (40, 8, 4))[0]
    # step k, rank r gets samples 8 + 4k + 2r and 8 + 4k + 2r + 1 of the global order
    for rank, result in enumerate(results):
        assert len(result["batches"]) == 8
        for k, batch in enumerate(result["batches"]):
            first = 8 + 4 * k + 2 * rank
            assert batch == [train[first]["tokens"].tolist(), train[first + 1]["tokens"].tolist()]
