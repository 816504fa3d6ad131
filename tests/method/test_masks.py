"""Masks of docs/METHOD.md §3: hand-worked cases and properties over random L, B, kinds and document layouts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_mask

from nbdiff_megatron.method.masks import (
    annealed_training_mask,
    block_ids,
    document_positions,
    inference_mask,
    prefix_block_mask,
    training_mask,
    training_mask_mod,
    training_position_ids,
)

# ---------------------------------------------------------------------------------------------- hand cases


def test_context_causal_l4_b2_by_hand():
    # x_t rows see their own x_t block (M_BD) and x_0 of earlier blocks (M_OBC); x_0 rows are causal.
    expected = torch.tensor(
        [
            # x_t0 x_t1 x_t2 x_t3 | x_00 x_01 x_02 x_03
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(training_mask(4, 2), expected)


def test_block_causal_l4_b2_by_hand():
    got = training_mask(4, 2, kind="block_causal")
    clean = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(got[4:, 4:], clean)
    assert torch.equal(got[:4], training_mask(4, 2)[:4])  # the x_t rows do not depend on the kind


def test_short_last_block_and_packed_documents_by_hand():
    # L = 5, B = 2, documents [0 0 0 | 1 1]: blocks are {0,1},{2} and {3,4} (counted per document).
    doc = torch.tensor([0, 0, 0, 1, 1])
    assert torch.equal(document_positions(doc), torch.tensor([0, 1, 2, 0, 1]))
    assert torch.equal(block_ids(5, 2, doc), torch.tensor([0, 0, 1, 0, 0]))
    assert torch.equal(training_position_ids(5, doc), torch.tensor([0, 1, 2, 0, 1] * 2))
    m = training_mask(5, 2, doc_ids=doc)
    assert m[2, :5].tolist() == [False, False, True, False, False]  # x_t2 alone in its block
    assert m[2, 5:].tolist() == [True, True, False, False, False]  # sees x_0 of block 0 of doc 0
    assert m[3, :5].tolist() == [False, False, False, True, True]  # doc 1 starts a new block
    assert not m[3, 5:].any()  # first block of doc 1: no clean context, nothing across documents
    assert m[9, 5:].tolist() == [False, False, False, True, True]


def test_positions_without_documents():
    assert torch.equal(training_position_ids(3), torch.tensor([0, 1, 2, 0, 1, 2]))


def test_batched_doc_ids_give_one_mask_per_sample():
    doc = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])
    m = training_mask(4, 2, doc_ids=doc)
    assert m.shape == (2, 8, 8)
    assert torch.equal(m[0], training_mask(4, 2, doc_ids=doc[0]))
    assert torch.equal(m[1], training_mask(4, 2))
    assert training_position_ids(4, doc).shape == (2, 8)


def test_inference_masks():
    assert inference_mask(3, 2).all() and inference_mask(3, 2).shape == (2, 5)
    full = prefix_block_mask(3, 2)
    assert torch.equal(full[:3, :3], torch.ones(3, 3, dtype=torch.bool).tril())
    assert not full[:3, 3:].any()  # the committed prefix never sees the active block
    assert full[3:].all()


# ---------------------------------------------------------------------------------------------- properties


@st.composite
def layouts(draw):
    seq_len = draw(st.integers(1, 24))
    block_size = draw(st.integers(1, 9))
    kind = draw(st.sampled_from(["context_causal", "block_causal"]))
    if draw(st.booleans()):
        lengths, left = [], seq_len
        while left:
            n = draw(st.integers(1, left))
            lengths.append(n)
            left -= n
        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)) + draw(
            st.integers(0, 3)
        )
    else:
        doc = None
    return seq_len, block_size, kind, doc


def _reference(seq_len, block_size, kind, doc):
    """Literal transcription of the docs/METHOD.md §3 table, one entry at a time."""
    doc = [0] * seq_len if doc is None else doc.tolist()
    pos = [i - doc.index(doc[i]) for i in range(seq_len)]
    blk = [p // block_size for p in pos]
    m = torch.zeros(2 * seq_len, 2 * seq_len, dtype=torch.bool)
    for q in range(2 * seq_len):
        for k in range(2 * seq_len):
            i, j = q % seq_len, k % seq_len
            if doc[i] != doc[j]:
                continue
            if q < seq_len and k < seq_len:
                m[q, k] = blk[i] == blk[j]
            elif q < seq_len:
                m[q, k] = blk[j] < blk[i]
            elif k >= seq_len:
                m[q, k] = j <= i if kind == "context_causal" else blk[j] <= blk[i]
    return m


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_mask_equals_the_spec_table(layout):
    assert torch.equal(training_mask(*layout), _reference(*layout))


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_mask_properties(layout):
    seq_len, block_size, kind, doc = layout
    m = training_mask(seq_len, block_size, kind, doc)
    L = seq_len
    # x_0 never attends to x_t
    assert not m[L:, :L].any()
    # every query sees at least itself (no empty softmax row)
    assert m.diagonal().all()
    # an x_t token of block k sees exactly the x_0 positions of blocks < k of its own document and its own
    # x_t block
    docs = torch.zeros(L, dtype=torch.long) if doc is None else doc
    blk = block_ids(L, block_size, doc)
    for i in range(L):
        same_doc = docs == docs[i]
        assert torch.equal(m[i, L:], same_doc & (blk < blk[i]))
        assert torch.equal(m[i, :L], same_doc & (blk == blk[i]))
        # no position is seen twice (noised and clean)
        assert not (m[i, :L] & m[i, L:]).any()


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 20), st.sampled_from(["context_causal", "block_causal"]))
def test_block_size_one_clean_half_is_causal(seq_len, kind):
    m = training_mask(seq_len, 1, kind)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    assert torch.equal(m[seq_len:, seq_len:], causal)
    # B = 1 is AR: x_t[i] sees itself and the clean prefix j < i
    assert torch.equal(m[:seq_len, :seq_len], torch.eye(seq_len, dtype=torch.bool))
    assert torch.equal(m[:seq_len, seq_len:], causal & ~torch.eye(seq_len, dtype=torch.bool))


@settings(max_examples=25, deadline=None)
@given(layouts(), st.booleans())
def test_flex_mask_mod_equals_dense(layout, batched):
    seq_len, block_size, kind, doc = layout
    if batched and doc is not None:
        doc = torch.stack([doc, torch.zeros_like(doc)])
    mask_mod = training_mask_mod(seq_len, block_size, kind, doc)
    b = 2 if batched else 1
    got = create_mask(mask_mod, b, 1, 2 * seq_len, 2 * seq_len, device="cpu")[:, 0]
    dense = training_mask(seq_len, block_size, kind, doc)
    assert torch.equal(got, dense.expand(b, -1, -1))


@settings(max_examples=40, deadline=None)
@given(layouts(), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_annealed_mask_interpolates_and_never_sees_twice(layout, progress, seed):
    seq_len, block_size, kind, doc = layout
    gen = torch.Generator().manual_seed(seed)
    m = annealed_training_mask(seq_len, block_size, progress, generator=gen, kind=kind, doc_ids=doc)
    L = seq_len
    ar, bd = training_mask(L, 1, kind, doc), training_mask(L, block_size, kind, doc)
    assert not m[L:, :L].any()
    assert m.diagonal().all()
    # every entry is taken from one of the two endpoints
    assert not (m & ~(ar | bd)).any() and not (ar & bd & ~m).any()
    # each x_t query sees every earlier position of its target block exactly once (noised or clean)
    idx = torch.arange(L)
    earlier_same_block = bd[:L, :L] & (idx.unsqueeze(0) < idx.unsqueeze(1))
    seen_noised, seen_clean = m[:L, :L], m[:L, L:]
    assert not (seen_noised & seen_clean).any()
    assert torch.equal((seen_noised | seen_clean) & earlier_same_block, earlier_same_block)


@pytest.mark.parametrize("kind", ["context_causal", "block_causal"])
def test_annealed_mask_endpoints(kind):
    doc = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    gen = torch.Generator().manual_seed(0)
    for progress, block_size in ((0.0, 1), (1.0, 4)):
        got = annealed_training_mask(11, 4, progress, generator=gen, kind=kind, doc_ids=doc)
        assert torch.equal(got, training_mask(11, block_size, kind, doc))


def test_annealed_mask_fraction_tracks_progress():
    gen = torch.Generator().manual_seed(1)
    m = annealed_training_mask(256, 32, 0.3, generator=gen)
    bd = training_mask(256, 32)
    pairs = bd[:256, :256] & ~torch.eye(256, dtype=torch.bool)
    frac = (m[:256, :256] & pairs).sum() / pairs.sum()
    # 7936 Bernoulli(0.3) draws: std ~ 0.005
    assert abs(float(frac) - 0.3) < 0.03


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seq_len=4, block_size=0), "block_size"),
        (dict(seq_len=0, block_size=2), "seq_len"),
        (dict(seq_len=4, block_size=2, kind="causal"), "kind must be one of"),
        (dict(seq_len=4, block_size=2, doc_ids=torch.tensor([0, 0, 1])), "doc_ids must have shape"),
        (dict(seq_len=4, block_size=2, doc_ids=torch.tensor([0, 1, 0, 1])), "non-decreasing"),
        (dict(seq_len=2, block_size=2, doc_ids=torch.tensor([0.0, 1.0])), "integers"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        training_mask(**kwargs)
    if "kind" not in kwargs or kwargs["kind"] in ("context_causal", "block_causal"):
        with pytest.raises(ValueError, match=match):
            training_mask_mod(**kwargs)


def test_bad_progress_and_prefix():
    with pytest.raises(ValueError, match="progress"):
        annealed_training_mask(4, 2, 1.5, generator=torch.Generator())
    with pytest.raises(ValueError, match="prefix_len"):
        inference_mask(-1, 2)
    with pytest.raises(ValueError, match="block_len"):
        inference_mask(2, 0)
