"""TP=2 and PP=2 (gloo, 2 CPU ranks, through get_forward_backward_func) equal 1 rank within 1e-5."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nbdiff_megatron.model.parallel import free_port

SCRIPT = Path(__file__).with_name("multirank_check.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.multirank
@pytest.mark.parametrize("mode", ["tp", "pp"])
def test_two_ranks_match_one_rank(mode, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(SCRIPT), "--mode", mode, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    results = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("result_*.json"))]
    detail = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, detail
    assert len(results) == 2, detail
    for result in results:
        assert result["ok"], result
        assert result["max_grad_diff"] <= 1e-5
        assert not result["missing_grads"]
    losses = [r for r in results if r["loss"] is not None]
    assert losses and all(r["loss_diff"] <= 1e-5 for r in losses)
    if mode == "tp":
        assert all("model.num_attention_heads" in r["bad_heads_error"] for r in results)
