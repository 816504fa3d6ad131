"""NBDiff losses (docs/METHOD.md §4: eq. 5 L_MDM, eq. 1 L_AR, eq. 2 total) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdiff_megatron.method.losses import loss_token_counts, nbdiff_loss
from nbdiff_megatron.method.noise import block_layout, mask_tokens, sample_t

FAST = settings(max_examples=40, deadline=None)

# b = 2, L = 3, V = 3: rows 0..2 of each sequence are x_t logits, rows 3..5 are x_0 logits.
ROWS = [
    [[0, 1, 0], [1, 0, 0], [0, 0, 2], [0, 2, 0], [1, 1, 0], [0, 0, 0]],
    [[0, 0, 1], [2, 0, 0], [0, 1, 1], [1, 0, 2], [0, 1, 0], [3, 0, 0]],
]
X0 = [[0, 1, 2], [2, 2, 1]]
T = [[0.5, 0.5, 0.5], [0.25, 0.25, 0.8]]


def ce(seq: int, row: int, target: int) -> float:
    """Cross-entropy of ROWS[seq][row] for `target`, by hand: log Σ exp(z) - z[target]."""
    z = ROWS[seq][row]
    return math.log(sum(math.exp(v) for v in z)) - z[target]


def softmax(seq: int, row: int) -> list[float]:
    z = ROWS[seq][row]
    total = sum(math.exp(v) for v in z)
    return [math.exp(v) / total for v in z]


def logits(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(ROWS, dtype=dtype, requires_grad=True)


def bools(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


X0_T = torch.tensor(X0)
T_T = torch.tensor(T, dtype=torch.float64)

# The x_0 logit at i predicts x0[i + 1]: rows 3, 4 of each sequence, targets x0[1], x0[2].
AR_ALL = (ce(0, 3, 1) + ce(0, 4, 2) + ce(1, 3, 2) + ce(1, 4, 1)) / 4


def test_hand_case_without_shift():
    masked = bools([[0, 1, 1], [1, 0, 1]])
    # x_t logit at i predicts x0[i] at masked i, weighted 1/t, over the 6 loss tokens.
    mdm = (ce(0, 1, 1) / 0.5 + ce(0, 2, 2) / 0.5 + ce(1, 0, 2) / 0.25 + ce(1, 2, 1) / 0.8) / 6
    out = nbdiff_loss(logits(), X0_T, masked, T_T, ar_weight=0.3)
    assert out.mdm.item() == pytest.approx(mdm, rel=1e-12)
    assert out.ar.item() == pytest.approx(AR_ALL, rel=1e-12)
    assert out.total.item() == pytest.approx(0.7 * mdm + 0.3 * AR_ALL, rel=1e-12)
    assert (out.mdm_count.item(), out.ar_count.item()) == (6, 4)
    assert out.mdm_sum.item() == pytest.approx(mdm * 6, rel=1e-12)
    assert out.ar_sum.item() == pytest.approx(AR_ALL * 4, rel=1e-12)


def test_hand_case_with_shift():
    masked = bools([[0, 1, 1], [0, 1, 1]])  # position 0 starts a block: never masked with shift
    # x_t logit at i - 1 predicts x0[i].
    mdm = (ce(0, 0, 1) / 0.5 + ce(0, 1, 2) / 0.5 + ce(1, 0, 2) / 0.25 + ce(1, 1, 1) / 0.8) / 6
    out = nbdiff_loss(logits(), X0_T, masked, T_T, ar_weight=0.5, token_shift=True)
    assert out.mdm.item() == pytest.approx(mdm, rel=1e-12)
    assert out.ar.item() == pytest.approx(AR_ALL, rel=1e-12)
    assert out.total.item() == pytest.approx(0.5 * mdm + 0.5 * AR_ALL, rel=1e-12)


def test_hand_case_with_loss_mask():
    masked = bools([[0, 1, 1], [1, 0, 1]])
    loss_mask = bools([[0, 1, 1], [1, 1, 0]])
    # MDM: masked & loss_mask = (0,1), (0,2), (1,0), over 4 loss tokens.
    mdm = (ce(0, 1, 1) / 0.5 + ce(0, 2, 2) / 0.5 + ce(1, 0, 2) / 0.25) / 4
    # AR: a target counts when the loss mask allows the target token: x0[0][1], x0[0][2], x0[1][1].
    ar = (ce(0, 3, 1) + ce(0, 4, 2) + ce(1, 3, 2)) / 3
    out = nbdiff_loss(logits(), X0_T, masked, T_T, ar_weight=0.25, loss_mask=loss_mask)
    assert out.mdm.item() == pytest.approx(mdm, rel=1e-12)
    assert out.ar.item() == pytest.approx(ar, rel=1e-12)
    assert out.total.item() == pytest.approx(0.75 * mdm + 0.25 * ar, rel=1e-12)
    counts = loss_token_counts(X0_T, loss_mask=loss_mask)
    assert (counts[0].item(), counts[1].item()) == (4, 3)


def test_hand_case_with_documents():
    # Sequence 0 packs two documents [0, 1] and [2]: no AR prediction of x0[0][2] from position 1.
    masked = bools([[0, 1, 0], [0, 0, 0]])
    doc_ids = torch.tensor([[0, 0, 1], [0, 0, 0]])
    ar = (ce(0, 3, 1) + ce(1, 3, 2) + ce(1, 4, 1)) / 3
    out = nbdiff_loss(logits(), X0_T, masked, T_T, ar_weight=0.5, doc_ids=doc_ids)
    assert out.ar.item() == pytest.approx(ar, rel=1e-12)
    assert out.mdm.item() == pytest.approx(ce(0, 1, 1) / 0.5 / 6, rel=1e-12)
    assert loss_token_counts(X0_T, doc_ids=doc_ids)[1].item() == 3


def test_no_masked_token_is_finite_with_the_right_gradient():
    lg = logits()
    out = nbdiff_loss(lg, X0_T, torch.zeros(2, 3, dtype=torch.bool), T_T, ar_weight=0.5)
    assert out.mdm.item() == 0.0 and math.isfinite(out.total.item())
    assert out.total.item() == pytest.approx(0.5 * AR_ALL, rel=1e-12)
    out.total.backward()
    # d(total)/d(logit row) = λ / n_ar * (softmax - onehot(target)) on the 4 AR rows, 0 elsewhere.
    expected = [[[0.0] * 3 for _ in range(6)] for _ in range(2)]
    for seq, row, target in [(0, 3, 1), (0, 4, 2), (1, 3, 2), (1, 4, 1)]:
        p = softmax(seq, row)
        expected[seq][row] = [0.5 / 4 * (p[k] - (k == target)) for k in range(3)]
    torch.testing.assert_close(
        lg.grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15
    )


def test_no_loss_token_is_zero_with_a_zero_gradient():
    lg = logits()
    none = torch.zeros(2, 3, dtype=torch.bool)
    out = nbdiff_loss(lg, X0_T, bools([[0, 1, 1], [1, 0, 1]]), T_T, ar_weight=0.5, loss_mask=none)
    assert (out.total.item(), out.mdm.item(), out.ar.item()) == (0.0, 0.0, 0.0)
    out.total.backward()
    assert lg.grad is not None and not lg.grad.any()


def test_single_token_sequences_have_no_ar_term():
    lg = torch.zeros(1, 2, 4, requires_grad=True)
    out = nbdiff_loss(lg, torch.tensor([[1]]), bools([[1]]), torch.tensor([[0.5]]), ar_weight=0.5)
    assert out.ar.item() == 0.0 and out.ar_count.item() == 0
    assert out.mdm.item() == pytest.approx(math.log(4) / 0.5)
    out.total.backward()


def test_per_sequence_t_broadcasts():
    masked = bools([[0, 1, 1], [1, 0, 1]])
    t_seq = torch.tensor([0.5, 0.25], dtype=torch.float64)
    a = nbdiff_loss(logits(), X0_T, masked, t_seq, ar_weight=0.5)
    b = nbdiff_loss(logits(), X0_T, masked, t_seq[:, None].expand(2, 3), ar_weight=0.5)
    assert a.total.item() == pytest.approx(b.total.item(), rel=1e-15)


def naive_loss(lg, x0, masked, t, lam, shift, loss_mask, doc_ids):
    """Position-by-position reference of eq. 2 in float64, independent of the vectorised code."""
    b, seq_len = x0.shape
    logp = torch.log_softmax(lg.double(), dim=-1)
    mdm_sum, ar_sum, n_ar = 0.0, 0.0, 0
    for r in range(b):
        for i in range(seq_len):
            if masked[r, i] and loss_mask[r, i]:
                src = i - 1 if shift else i
                mdm_sum += -logp[r, src, x0[r, i]].item() / t[r, i].item()
            if i + 1 < seq_len and loss_mask[r, i + 1] and doc_ids[r, i] == doc_ids[r, i + 1]:
                ar_sum += -logp[r, seq_len + i, x0[r, i + 1]].item()
                n_ar += 1
    mdm = mdm_sum / max(int(loss_mask.sum()), 1)
    ar = ar_sum / max(n_ar, 1)
    return (1 - lam) * mdm + lam * ar, mdm, ar


@FAST
@given(
    batch=st.integers(1, 3),
    seq_len=st.integers(1, 12),
    vocab=st.integers(2, 9),
    block_size=st.integers(1, 5),
    shift=st.booleans(),
    lam=st.floats(0.0, 1.0),
    packed=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_a_position_by_position_reference(
    batch, seq_len, vocab, block_size, shift, lam, packed, seed
):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, vocab - 1, (batch, seq_len), generator=g)
    doc_ids = torch.cumsum((torch.rand(batch, seq_len, generator=g) < 0.2).long(), dim=1)
    positions = None
    if packed:
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        idx = torch.arange(seq_len).expand(batch, -1)
        start_idx = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
        positions = idx - start_idx
    else:
        doc_ids = torch.zeros_like(doc_ids)
    layout = block_layout(batch, seq_len, block_size=block_size, positions=positions)
    t_blocks = sample_t(batch, n_blocks=layout.n_blocks, generator=g)
    _, masked = mask_tokens(
        x0,
        t_blocks,
        block_size=block_size,
        mask_id=vocab - 1,
        token_shift=shift,
        positions=positions,
        generator=g,
    )
    t_tok = torch.gather(t_blocks, 1, layout.index.contiguous())
    loss_mask = torch.rand(batch, seq_len, generator=g) < 0.8
    lg = torch.randn(batch, 2 * seq_len, vocab, generator=g, dtype=torch.float64)
    out = nbdiff_loss(
        lg,
        x0,
        masked,
        t_tok,
        ar_weight=lam,
        token_shift=shift,
        loss_mask=loss_mask,
        doc_ids=doc_ids if packed else None,
    )
    total, mdm, ar = naive_loss(lg, x0, masked, t_tok, lam, shift, loss_mask, doc_ids)
    assert out.mdm.item() == pytest.approx(mdm, rel=1e-9, abs=1e-12)
    assert out.ar.item() == pytest.approx(ar, rel=1e-9, abs=1e-12)
    assert out.total.item() == pytest.approx(total, rel=1e-9, abs=1e-12)


def random_case(seed: int, batch: int = 4, seq_len: int = 8, vocab: int = 11):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, vocab - 1, (batch, seq_len), generator=g)
    t = sample_t(batch, n_blocks=2, generator=g)
    _, masked = mask_tokens(x0, t, block_size=4, mask_id=vocab - 1, token_shift=True, generator=g)
    t_tok = t.repeat_interleave(4, dim=1)
    loss_mask = torch.rand(batch, seq_len, generator=g) < 0.7
    lg = torch.randn(batch, 2 * seq_len, vocab, generator=g)
    return lg, x0, masked, t_tok, loss_mask


def test_micro_batches_with_global_denominators_sum_to_the_full_batch():
    lg, x0, masked, t, loss_mask = random_case(0)
    full_logits = lg.clone().requires_grad_()
    full = nbdiff_loss(
        full_logits, x0, masked, t, ar_weight=0.4, token_shift=True, loss_mask=loss_mask
    )
    full.total.backward()
    halves = [slice(0, 2), slice(2, 4)]
    counts = [loss_token_counts(x0[h], loss_mask=loss_mask[h]) for h in halves]
    mdm_den = sum(c[0] for c in counts)
    ar_den = sum(c[1] for c in counts)
    micro_logits = lg.clone().requires_grad_()
    total = 0.0
    for h in halves:
        part = nbdiff_loss(
            micro_logits[h],
            x0[h],
            masked[h],
            t[h],
            ar_weight=0.4,
            token_shift=True,
            loss_mask=loss_mask[h],
            mdm_denominator=mdm_den,
            ar_denominator=ar_den,
        )
        part.total.backward()
        total += part.total.item()
    assert total == pytest.approx(full.total.item(), rel=1e-6)
    torch.testing.assert_close(micro_logits.grad, full_logits.grad, rtol=1e-5, atol=1e-8)


def test_chunking_layout_and_precision_do_not_change_the_result():
    lg, x0, masked, t, loss_mask = random_case(1)
    kwargs = dict(ar_weight=0.5, token_shift=True, loss_mask=loss_mask)
    ref = nbdiff_loss(lg, x0, masked, t, **kwargs).total
    assert nbdiff_loss(lg, x0, masked, t, chunk_rows=1, **kwargs).total.item() == pytest.approx(
        ref.item(), rel=1e-6
    )
    # Logits laid out [2L, b, V] (megatron's sequence-first order), seen as [b, 2L, V].
    seq_first = lg.transpose(0, 1).contiguous().transpose(0, 1)
    assert not seq_first.is_contiguous()
    assert nbdiff_loss(seq_first, x0, masked, t, **kwargs).total.item() == pytest.approx(
        ref.item(), rel=1e-6
    )
    # bf16 logits are upcast row by row: same as the fp32 loss of the same (rounded) values.
    bf16 = lg.to(torch.bfloat16)
    got = nbdiff_loss(bf16, x0, masked, t, **kwargs)
    assert got.total.dtype == torch.float32
    assert got.total.item() == pytest.approx(
        nbdiff_loss(bf16.float(), x0, masked, t, **kwargs).total.item(), rel=1e-6
    )


@pytest.mark.parametrize(
    "change, name",
    [
        ({"logits": torch.zeros(2, 5, 3)}, "logits"),
        ({"logits": torch.zeros(2, 6)}, "logits"),
        ({"x0": torch.zeros(2, 3)}, "x0"),
        ({"x0": torch.tensor([[0, 1, 3], [0, 0, 0]])}, "x0"),
        ({"masked": torch.zeros(2, 3, dtype=torch.long)}, "masked"),
        ({"masked": torch.zeros(2, 4, dtype=torch.bool)}, "masked"),
        ({"t": torch.zeros(2, 3)}, "t must lie"),
        ({"t": torch.full((2, 3), 1.5)}, "t must lie"),
        ({"t": torch.full((3, 2), 0.5)}, "t must be"),
        ({"ar_weight": 1.5}, "ar_weight"),
        ({"loss_mask": torch.ones(2, 3)}, "loss_mask"),
        ({"loss_mask": torch.ones(1, 3, dtype=torch.bool)}, "loss_mask"),
        ({"doc_ids": torch.zeros(2, 2, dtype=torch.long)}, "doc_ids"),
        ({"chunk_rows": 0}, "chunk_rows"),
    ],
)
def test_bad_arguments(change, name):
    args = {
        "logits": torch.zeros(2, 6, 3),
        "x0": torch.tensor(X0),
        "masked": bools([[0, 1, 1], [1, 0, 1]]),
        "t": torch.full((2, 3), 0.5),
        "ar_weight": 0.5,
    } | change
    positional = [args.pop(k) for k in ("logits", "x0", "masked", "t")]
    with pytest.raises(ValueError, match=name):
        nbdiff_loss(*positional, **args)


def test_token_shift_rejects_masked_first_tokens():
    lg = torch.zeros(2, 6, 3)
    t = torch.full((2, 3), 0.5)
    with pytest.raises(ValueError, match="first token"):
        nbdiff_loss(lg, X0_T, bools([[1, 0, 0], [0, 0, 0]]), t, ar_weight=0.5, token_shift=True)
    with pytest.raises(ValueError, match="document's first token"):
        nbdiff_loss(
            lg,
            X0_T,
            bools([[0, 0, 1], [0, 0, 0]]),
            t,
            ar_weight=0.5,
            token_shift=True,
            doc_ids=torch.tensor([0, 0, 1]),
        )
    # The same masks pass when the loss mask excludes those tokens.
    nbdiff_loss(
        lg,
        X0_T,
        bools([[1, 0, 0], [0, 0, 0]]),
        t,
        ar_weight=0.5,
        token_shift=True,
        loss_mask=bools([[0, 1, 1], [1, 1, 1]]),
    )


def test_token_shift_rejects_masked_block_starts_inside_a_document():
    # L = 6, B = 3: token 3 starts block 1 inside the single document; with shift its x_t
    # predecessor (logit 2) belongs to block 0, so a masked token 3 is a masking bug.
    x0 = torch.tensor([[0, 1, 2, 0, 1, 2]])
    lg = torch.zeros(1, 12, 3)
    t = torch.full((1, 6), 0.5)
    bad = bools([[0, 1, 0, 1, 0, 0]])
    # Without block_size only sequence and document starts are checked: this passes.
    nbdiff_loss(lg, x0, bad, t, ar_weight=0.5, token_shift=True)
    with pytest.raises(ValueError, match="block's first token"):
        nbdiff_loss(lg, x0, bad, t, ar_weight=0.5, token_shift=True, block_size=3)
    # Excluded by the loss mask, not shifted, or not validated: no error.
    lm = bools([[1, 1, 1, 0, 1, 1]])
    nbdiff_loss(lg, x0, bad, t, ar_weight=0.5, token_shift=True, block_size=3, loss_mask=lm)
    nbdiff_loss(lg, x0, bad, t, ar_weight=0.5, token_shift=False, block_size=3)
    nbdiff_loss(lg, x0, bad, t, ar_weight=0.5, token_shift=True, block_size=3, validate=False)
    # Packed: documents of 2 and 4 tokens, B = 3 -> blocks start at 0, 2 and 5 (position 3 of
    # document 2). Token 3 is inside a block there, token 5 is a block start.
    pos = torch.tensor([0, 1, 0, 1, 2, 3])
    docs = torch.tensor([0, 0, 1, 1, 1, 1])
    ok = bools([[0, 1, 0, 1, 1, 0]])
    nbdiff_loss(lg, x0, ok, t, ar_weight=0.5, token_shift=True, block_size=3, positions=pos)
    for kwargs in ({"positions": pos}, {"doc_ids": docs}, {"positions": pos, "doc_ids": docs}):
        nbdiff_loss(lg, x0, ok, t, ar_weight=0.5, token_shift=True, block_size=3, **kwargs)
        with pytest.raises(ValueError, match="block's first token"):
            nbdiff_loss(
                lg,
                x0,
                bools([[0, 0, 0, 0, 0, 1]]),
                t,
                ar_weight=0.5,
                token_shift=True,
                block_size=3,
                **kwargs,
            )
    with pytest.raises(ValueError, match="block_size"):
        nbdiff_loss(lg, x0, ok, t, ar_weight=0.5, token_shift=True, block_size=0)


@FAST
@given(
    block_size=st.integers(1, 5),
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_mask_tokens_with_shift_always_passes_block_validation(block_size, lengths, seed):
    # The masks mask_tokens(token_shift=True) draws never trip the block-start check.
    g = torch.Generator().manual_seed(seed)
    pos = torch.cat([torch.arange(n) for n in lengths])
    seq_len = pos.numel()
    x0 = torch.randint(0, 5, (2, seq_len), generator=g)
    t = sample_t(2, generator=g)
    _, masked = mask_tokens(
        x0, t, block_size=block_size, mask_id=5, token_shift=True, positions=pos, generator=g
    )
    lg = torch.zeros(2, 2 * seq_len, 6)
    nbdiff_loss(
        lg, x0, masked, t, ar_weight=0.5, token_shift=True, block_size=block_size, positions=pos
    )


@pytest.mark.parametrize("token_shift", [False, True])
def test_row_subsets_add_up_to_the_full_loss(token_shift):
    """`rows=`: any partition of the 2L logit rows gives terms that sum to the full ones."""
    gen = torch.Generator().manual_seed(3)
    b, L, V, B = 2, 12, 11, 4
    x0 = torch.randint(0, V - 1, (b, L), generator=gen)
    doc_ids = torch.tensor([[0] * 7 + [1] * 5, [0] * 12])
    positions = torch.stack([torch.cat([torch.arange(7), torch.arange(5)]), torch.arange(12)])
    t = torch.rand(b, generator=gen) * 0.8 + 0.1
    x_t, masked = mask_tokens(
        x0,
        t,
        block_size=B,
        mask_id=V - 1,
        token_shift=token_shift,
        generator=gen,
        positions=positions,
    )
    loss_mask = torch.rand(b, L, generator=gen) > 0.2
    logits = torch.randn(b, 2 * L, V, generator=gen, dtype=torch.float64, requires_grad=True)
    kw = dict(ar_weight=0.3, token_shift=token_shift, loss_mask=loss_mask, doc_ids=doc_ids)
    full = nbdiff_loss(logits, x0, masked, t, **kw)
    perm = torch.randperm(2 * L, generator=gen)
    parts = [perm[:9], perm[9:17], perm[17:]]
    pieces = [nbdiff_loss(logits[:, r], x0, masked, t, rows=r, **kw) for r in parts]
    for name in ("mdm_sum", "ar_sum", "mdm_count", "ar_count"):
        total = sum(getattr(p, name) for p in pieces)
        assert torch.allclose(total, getattr(full, name), atol=1e-12), name
    # with the global denominators, the per-part totals add up to the full total
    mdm_den, ar_den = full.mdm_count, full.ar_count
    shares = [
        nbdiff_loss(
            logits[:, r],
            x0,
            masked,
            t,
            rows=r,
            mdm_denominator=mdm_den,
            ar_denominator=ar_den,
            **kw,
        ).total
        for r in parts
    ]
    assert torch.allclose(sum(shares), full.total, atol=1e-12)
    with pytest.raises(ValueError, match="len\\(rows\\)"):
        nbdiff_loss(logits[:, :5], x0, masked, t, rows=parts[0], **kw)
