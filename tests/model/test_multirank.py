"""TP=2 and PP=2 (gloo, 2 CPU ranks, through get_forward_backward_func) equal 1 rank within 1e-5."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launch import output_tail, run_torchrun

SCRIPT = Path(__file__).with_name("multirank_check.py")


@pytest.mark.multirank
@pytest.mark.parametrize("mode", ["tp", "pp"])
def test_two_ranks_match_one_rank(mode, tmp_path):
    proc = run_torchrun([SCRIPT, "--mode", mode, "--out", tmp_path], nproc=2, timeout=240)
    results = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("result_*.json"))]
    assert len(results) == 2, output_tail(proc)
    for result in results:
        assert result["ok"], result
        assert result["max_grad_diff"] <= 1e-5
        assert not result["missing_grads"]
    losses = [r for r in results if r["loss"] is not None]
    assert losses and all(r["loss_diff"] <= 1e-5 for r in losses)
    if mode == "tp":
        assert all("model.num_attention_heads" in r["bad_heads_error"] for r in results)
