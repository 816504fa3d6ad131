"""nbdiff_linear_loss equals nbdiff_loss(hidden @ weight.T) in value and gradients (1 rank)."""

from __future__ import annotations

import pytest
import torch

from nbdiff_megatron.kernels import nbdiff_linear_loss
from nbdiff_megatron.method.losses import loss_token_counts, nbdiff_loss
from nbdiff_megatron.method.noise import mask_tokens

B, L, H, V = 2, 24, 16, 50


def _batch(seed: int, *, token_shift: bool, block: int = 4, docs: bool = True):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, V - 1, (B, L), generator=gen)
    doc_ids = torch.tensor([0] * 10 + [1] * 9 + [2] * 5).expand(B, L) if docs else None
    t = torch.rand(B, L, generator=gen) * 0.8 + 0.2  # per-token t (position-dependent masking)
    positions = None
    if doc_ids is not None:
        from nbdiff_megatron.method.masks import document_positions

        positions = document_positions(doc_ids)
    # Per-token t weights the loss (position-dependent masking); the mask itself is drawn per block.
    _, masked = mask_tokens(
        x0,
        t[:, :1].squeeze(1),
        block_size=block,
        mask_id=V - 1,
        token_shift=token_shift,
        generator=gen,
        positions=positions,
    )
    loss_mask = torch.rand(B, L, generator=gen) > 0.2
    return x0, masked, t, doc_ids, loss_mask


def _leaves(seed: int, vocab_rows: int = V, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, 2 * L, H, generator=gen, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab_rows, H, generator=gen, dtype=dtype) * 0.5).requires_grad_()
    return hidden, weight


@pytest.mark.parametrize("token_shift", [False, True])
@pytest.mark.parametrize("ar_weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("use_docs", [False, True])
def test_equals_reference_values_and_gradients(token_shift, ar_weight, use_docs):
    x0, masked, t, doc_ids, loss_mask = _batch(0, token_shift=token_shift, docs=use_docs)
    kwargs = dict(
        ar_weight=ar_weight,
        token_shift=token_shift,
        loss_mask=loss_mask,
        doc_ids=doc_ids,
        block_size=4,
    )
    h_ref, w_ref = _leaves(1)
    ref = nbdiff_loss(h_ref @ w_ref.t(), x0, masked, t, **kwargs)
    ref.total.backward()
    h, w = _leaves(1)
    fused = nbdiff_linear_loss(h, w, x0, masked, t, chunk_rows=5, **kwargs)
    fused.total.backward()
    for a, b in zip(fused, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-9, atol=1e-12)


def test_denominators_padded_vocab_and_sequence_first():
    x0, masked, t, doc_ids, loss_mask = _batch(3, token_shift=True)
    mdm_d, ar_d = loss_token_counts(x0, loss_mask=loss_mask, doc_ids=doc_ids)
    kwargs = dict(
        ar_weight=0.5,
        token_shift=True,
        loss_mask=loss_mask,
        doc_ids=doc_ids,
        mdm_denominator=mdm_d * 3,
        ar_denominator=ar_d * 3,
    )
    # A padded table of 64 rows: the 14 padding rows never score and get no gradient.
    h_ref, w_ref = _leaves(4, vocab_rows=64)
    ref = nbdiff_loss((h_ref @ w_ref.t())[..., :V], x0, masked, t, **kwargs)
    (ref.total * 2).backward()
    h, w = _leaves(4, vocab_rows=64)
    fused = nbdiff_linear_loss(
        h.transpose(0, 1), w, x0, masked, t, vocab_size=V, sequence_first=True, **kwargs
    )
    (fused.total * 2).backward()
    torch.testing.assert_close(fused.total, ref.total, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-9, atol=1e-12)
    assert torch.count_nonzero(w.grad[V:]) == 0


@pytest.mark.parametrize("chunk_rows", [5, None])
def test_projecting_the_padded_shard_equals_the_real_columns(chunk_rows):
    # 14 padding columns masked to -inf instead of sliced off: the same values and gradients, and
    # the padding rows of the weight get an exactly zero gradient.
    x0, masked, t, doc_ids, loss_mask = _batch(5, token_shift=True)
    kwargs = dict(ar_weight=0.4, token_shift=True, loss_mask=loss_mask, doc_ids=doc_ids)
    results = {}
    for padded in (False, True):
        h, w = _leaves(6, vocab_rows=64)
        terms = nbdiff_linear_loss(
            h,
            w,
            x0,
            masked,
            t,
            vocab_size=V,
            chunk_rows=chunk_rows,
            project_padded=padded,
            **kwargs,
        )
        terms.total.backward()
        results[padded] = (terms, h.grad, w.grad)
    (ref, h_ref, w_ref), (got, h_got, w_got) = results[False], results[True]
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_got, h_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w_got, w_ref, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(w_got[V:]) == 0


def test_separate_term_gradients():
    """mdm and ar are differentiable on their own (per-row upstream gradients, not one scalar)."""
    x0, masked, t, doc_ids, loss_mask = _batch(5, token_shift=False)
    kwargs = dict(ar_weight=0.2, loss_mask=loss_mask, doc_ids=doc_ids)
    h_ref, w_ref = _leaves(6)
    ref = nbdiff_loss(h_ref @ w_ref.t(), x0, masked, t, **kwargs)
    (3 * ref.mdm - ref.ar).backward()
    h, w = _leaves(6)
    fused = nbdiff_linear_loss(h, w, x0, masked, t, **kwargs)
    (3 * fused.mdm - fused.ar).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-9, atol=1e-12)


def test_context_parallel_rows_sum_to_full_loss():
    """With `rows` (a CP rank's rows), disjoint row sets add up to the full loss."""
    x0, masked, t, doc_ids, loss_mask = _batch(7, token_shift=True)
    mdm_d, ar_d = loss_token_counts(x0, loss_mask=loss_mask, doc_ids=doc_ids)
    kwargs = dict(
        ar_weight=0.4,
        token_shift=True,
        loss_mask=loss_mask,
        doc_ids=doc_ids,
        mdm_denominator=mdm_d,
        ar_denominator=ar_d,
    )
    h, w = _leaves(8)
    full = nbdiff_linear_loss(h, w, x0, masked, t, **kwargs)
    perm = torch.randperm(2 * L, generator=torch.Generator().manual_seed(0))
    parts = [perm[:L], perm[L:]]
    total = sum(
        nbdiff_linear_loss(h[:, rows], w, x0, masked, t, rows=rows, **kwargs).total
        for rows in parts
    )
    torch.testing.assert_close(total, full.total, rtol=1e-10, atol=1e-12)


def test_empty_batch_is_zero_with_zero_gradient():
    x0, masked, t, _, _ = _batch(9, token_shift=False, docs=False)
    h, w = _leaves(10)
    none = torch.zeros_like(masked)
    terms = nbdiff_linear_loss(h, w, x0, none, t, ar_weight=0.0, loss_mask=none)
    terms.total.backward()
    assert float(terms.total) == 0.0
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_bad_inputs_name_the_argument():
    x0, masked, t, _, _ = _batch(11, token_shift=False, docs=False)
    h, w = _leaves(12)
    with pytest.raises(ValueError, match="weight must be"):
        nbdiff_linear_loss(h, w[:, :3], x0, masked, t, ar_weight=0.0)
    with pytest.raises(ValueError, match="vocabulary"):
        nbdiff_linear_loss(h, w, x0, masked, t, ar_weight=0.0, vocab_size=V + 1)
    with pytest.raises(ValueError, match="hidden must cover"):
        nbdiff_linear_loss(h[:, :-1], w, x0, masked, t, ar_weight=0.0)
    with pytest.raises(ValueError, match="outside"):
        nbdiff_linear_loss(h, w[:10], x0, masked, t, ar_weight=0.0)


def test_memory_does_not_hold_rows_by_vocab():
    """What autograd keeps is O(rows x h + V x h), not O(rows x V)."""
    x0, masked, t, _, _ = _batch(13, token_shift=False, docs=False)
    vocab = 4096
    hidden = torch.randn(B, 2 * L, H, requires_grad=True)
    weight = torch.randn(vocab, H, requires_grad=True)
    saved: list[int] = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        nbdiff_linear_loss(hidden, weight, x0, masked, t, ar_weight=0.5)
    rows = 2 * B * L
    assert max(saved) <= max(vocab * H, B * 2 * L * H)
    assert all(n < rows * vocab // 4 for n in saved)


def test_accumulates_into_main_grad_like_megatron_ddp():
    """accumulate_into_main_grad adds d W to weight.main_grad (on top of what is there) and gives
    autograd no weight gradient; the hidden gradient is unchanged."""
    x0, masked, t, doc_ids, loss_mask = _batch(23, token_shift=True)
    kwargs = dict(ar_weight=0.4, token_shift=True, loss_mask=loss_mask, doc_ids=doc_ids)
    h_ref, w_ref = _leaves(24)
    nbdiff_loss(h_ref @ w_ref.t(), x0, masked, t, **kwargs).total.backward()
    h, w = _leaves(24)
    earlier = torch.randn(w.shape, dtype=w.dtype, generator=torch.Generator().manual_seed(25))
    w.main_grad = earlier.clone()  # e.g. the previous micro-batches' sum
    terms = nbdiff_linear_loss(h, w, x0, masked, t, accumulate_into_main_grad=True, **kwargs)
    terms.total.backward()
    assert w.grad is None
    torch.testing.assert_close(w.main_grad, earlier + w_ref.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="main_grad"):
        nbdiff_linear_loss(*_leaves(26), x0, masked, t, accumulate_into_main_grad=True, **kwargs)


def test_low_precision_weight_gradient_is_accumulated_in_vocabulary_slices(monkeypatch):
    """bf16 GEMMs into an fp32 accumulator go slice by slice (bounded temporary), same sum."""
    from nbdiff_megatron.kernels import linear_loss

    monkeypatch.setattr(linear_loss, "_CHUNK_ELEMENTS", 7 * H)  # 7 vocabulary rows per slice
    gen = torch.Generator().manual_seed(27)
    d = torch.randn(5, V, generator=gen).bfloat16()
    h = torch.randn(5, H, generator=gen).bfloat16()
    dst = torch.randn(V, H, generator=gen)
    expected = dst + (d.float().t() @ h.float())
    linear_loss._accumulate_weight_grad(dst, d, h)
    torch.testing.assert_close(dst, expected, rtol=2e-2, atol=2e-2)


def test_tensor_parallel_two_ranks_equal_one_rank():
    """TP = 2 on gloo (vocab shards, padded vocabulary, with and without SP, projecting the real or
    the padded shard) equals 1 rank."""
    from pathlib import Path

    from tests.launch import run_torchrun

    proc = run_torchrun([Path(__file__).with_name("tp_linear_loss_check.py")], timeout=180)
    assert "sp=True padded=False grad_weight" in proc.stdout
    assert "rank 1 sp=False padded=True grad_weight" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_cuda_matches_the_reference():
    """On the GPU in bf16 (the training dtype): values and gradients within bf16 rounding."""
    x0, masked, t, doc_ids, loss_mask = _batch(21, token_shift=True)
    args = [x.cuda() if x is not None else None for x in (x0, masked, t, doc_ids, loss_mask)]
    x0, masked, t, doc_ids, loss_mask = args
    kwargs = dict(ar_weight=0.5, token_shift=True, loss_mask=loss_mask, doc_ids=doc_ids)
    h64, w64 = _leaves(22)
    results = {}
    for name in ("reference", "fused"):
        h = h64.detach().to("cuda", torch.bfloat16).requires_grad_()
        w = w64.detach().to("cuda", torch.bfloat16).requires_grad_()
        if name == "reference":
            terms = nbdiff_loss(h @ w.t(), x0, masked, t, **kwargs)
        else:
            terms = nbdiff_linear_loss(h, w, x0, masked, t, **kwargs)
        terms.total.backward()
        results[name] = (terms.total.float(), h.grad.float(), w.grad.float())
    for a, b in zip(results["fused"], results["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * max(1.0, float(b.abs().max())))
