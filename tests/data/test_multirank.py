"""Two gloo ranks build the same datasets (rank 0 fills megatron's cache first) and split them."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nbdiff_megatron.data.bundled import bundled_tokenizer_path
from nbdiff_megatron.data.config import DataConfig
from nbdiff_megatron.data.datasets import build_datasets

SCRIPT = Path(__file__).with_name("multirank_data_check.py")
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multirank
def test_two_data_parallel_ranks_share_the_global_order(small_prefix, tokenizer, tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        str(SCRIPT),
        "--prefix",
        small_prefix,
        "--cache",
        str(cache),
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
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
