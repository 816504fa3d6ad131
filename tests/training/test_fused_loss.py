"""Training with the fused loss (the default) equals training with the reference loss path."""

from __future__ import annotations

import pytest

from .runs import train_in_process


@pytest.mark.parametrize("tie", [True, False])
def test_fused_loss_trains_like_the_reference_path(corpus_prefix: str, tie: bool) -> None:
    # B = 2 with λ = 0.5, token shift on, packed documents: both terms and every row rule are live.
    # The fused loss adds d W straight into DDP's main_grad: tied, the embedding's gradient still
    # arrives through autograd; untied, the output weight gets no autograd gradient at all.
    extra = [
        f"--model.tie_embeddings={str(tie).lower()}",
        "--curriculum.start_block_size=2",
        "--curriculum.target_block_size=2",
        "--train.steps=3",
    ]
    fused = train_in_process(corpus_prefix, *extra).history
    reference = train_in_process(corpus_prefix, *extra, "--loss.fused=false").history
    assert len(fused) == len(reference) == 3
    for mine, ref in zip(fused, reference, strict=True):
        for key in ("loss", "mdm", "ar"):
            assert mine[key] == pytest.approx(ref[key], abs=1e-5), (mine["step"], key)
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), mine["step"]


def test_fused_padded_projection_trains_like_the_real_columns(corpus_prefix: str) -> None:
    # 4096 tokens padded to 5000 columns: 904 masked columns projected with the flag.
    extra = ["--model.make_vocab_size_divisible_by=1000", "--train.steps=2"]
    real = train_in_process(corpus_prefix, *extra).history
    padded = train_in_process(corpus_prefix, *extra, "--loss.fused_padded_projection=true").history
    for mine, ref in zip(padded, real, strict=True):
        for key in ("loss", "mdm", "ar"):
            assert mine[key] == pytest.approx(ref[key], rel=1e-6), (mine["step"], key)
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6), mine["step"]
