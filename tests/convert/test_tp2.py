"""A TP=1 conversion loads under TP=2 (2 gloo ranks, torchrun) and still gives the HF logits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nbdiff_megatron.model.parallel import free_port

from .conftest import MODELS, ROOT, hf_logits

SCRIPT = Path(__file__).with_name("tp2_forward.py")


@pytest.mark.parametrize("kind", ["qwen3_untied", "qwen2_tied"])
def test_tp2_forward_matches_hf(kind, converted, tmp_path):
    hf_dir, mcore_dir, model = converted(kind)
    vocab = MODELS[kind][1]["vocab_size"]
    ids = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / "ids.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(SCRIPT), str(mcore_dir), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(tmp_path / "logits.pt")
    ref = hf_logits(model, ids)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
