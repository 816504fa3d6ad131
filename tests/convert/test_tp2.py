"""A TP=1 conversion loads under TP=2 (2 gloo ranks, torchrun) and still gives the HF logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.launch import run_torchrun

from .conftest import MODELS, hf_logits

SCRIPT = Path(__file__).with_name("tp2_forward.py")


@pytest.mark.parametrize("kind", ["qwen3_untied", "qwen2_tied"])
def test_tp2_forward_matches_hf(kind, converted, tmp_path):
    hf_dir, mcore_dir, model = converted(kind)
    vocab = MODELS[kind][1]["vocab_size"]
    ids = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / "ids.pt")
    run_torchrun(
        [SCRIPT, mcore_dir, tmp_path / "ids.pt", tmp_path / "logits.pt"], nproc=2, timeout=180
    )
    got = torch.load(tmp_path / "logits.pt")
    ref = hf_logits(model, ids)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
