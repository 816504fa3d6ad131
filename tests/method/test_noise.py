"""Noising (docs/METHOD.md §4): t sampling, block layout, masking probability, token masking."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdiff_megatron.method.noise import (
    block_layout,
    mask_probability,
    mask_tokens,
    per_token_t,
    sample_t,
)

FAST = settings(max_examples=60, deadline=None)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def positions_from_lengths(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])


# --- sample_t


def test_sample_t_shapes_and_default_range():
    t = sample_t(1000, generator=gen())
    assert t.shape == (1000,) and t.dtype == torch.float32
    assert float(t.min()) >= 1e-3 and float(t.max()) <= 1.0
    assert sample_t(3, n_blocks=5, generator=gen()).shape == (3, 5)


def test_sample_t_degenerate_range_is_exact():
    t = sample_t(4, n_blocks=2, lo=0.3, hi=0.3, generator=gen())
    assert torch.equal(t, torch.full((4, 2), 0.3))


def test_sample_t_is_reproducible_from_the_seed_only():
    assert torch.equal(sample_t(8, generator=gen(7)), sample_t(8, generator=gen(7)))
    assert not torch.equal(sample_t(8, generator=gen(7)), sample_t(8, generator=gen(8)))
    # The global RNG plays no part.
    torch.manual_seed(0)
    a = sample_t(8, generator=gen(3))
    torch.manual_seed(1)
    assert torch.equal(a, sample_t(8, generator=gen(3)))


def test_sample_t_antithetic_hand_case():
    # batch 5: rows 2,3 mirror rows 0,1 around (lo + hi) / 2 = 0.5; row 4 is an independent draw.
    t = sample_t(5, lo=0.2, hi=0.8, antithetic=True, generator=gen(1))
    assert t[2].item() == pytest.approx(1.0 - t[0].item(), abs=1e-6)
    assert t[3].item() == pytest.approx(1.0 - t[1].item(), abs=1e-6)


@FAST
@given(
    batch=st.integers(1, 9),
    n_blocks=st.one_of(st.none(), st.integers(1, 6)),
    lo=st.floats(1e-4, 1.0),
    width=st.floats(0.0, 1.0),
    antithetic=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_sample_t_lies_in_range_and_pairs_mirror(batch, n_blocks, lo, width, antithetic, seed):
    hi = lo + (1.0 - lo) * width
    t = sample_t(batch, n_blocks=n_blocks, lo=lo, hi=hi, antithetic=antithetic, generator=gen(seed))
    assert t.shape == ((batch,) if n_blocks is None else (batch, n_blocks))
    lo32, hi32 = torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
    assert bool((t >= lo32).all()) and bool((t <= hi32).all())
    if antithetic:
        half = batch // 2
        torch.testing.assert_close(
            t[:half] + t[half : 2 * half],
            torch.full_like(t[:half], lo + hi),
            atol=2e-7 * 4,
            rtol=0,
        )


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"batch": 0}, "batch"),
        ({"batch": 2, "n_blocks": 0}, "n_blocks"),
        ({"batch": 2, "eps": 0.0}, "eps"),
        ({"batch": 2, "eps": 1.0}, "eps"),
        ({"batch": 2, "lo": 0.0}, "lo"),
        ({"batch": 2, "lo": 0.5, "hi": 0.4}, "hi"),
        ({"batch": 2, "hi": 1.5}, "hi"),
    ],
)
def test_sample_t_bad_arguments(kwargs, name):
    batch = kwargs.pop("batch")
    with pytest.raises(ValueError, match=name):
        sample_t(batch, generator=gen(), **kwargs)


def test_sample_t_requires_a_generator():
    with pytest.raises(ValueError, match="generator"):
        sample_t(2, generator=None)


# --- block layout


def test_block_layout_plain_hand_case():
    layout = block_layout(1, 7, block_size=3)
    assert layout.index.tolist() == [[0, 0, 0, 1, 1, 1, 2]]
    assert layout.offset.tolist() == [[0, 1, 2, 0, 1, 2, 0]]
    assert layout.is_start.tolist() == [[True, False, False, True, False, False, True]]
    assert layout.n_blocks == 3


def test_block_layout_packed_hand_case():
    # Documents of lengths 4, 2, 3 with B = 2: blocks restart at each document.
    pos = positions_from_lengths([4, 2, 3])
    layout = block_layout(1, 9, block_size=2, positions=pos)
    assert layout.index.tolist() == [[0, 0, 1, 1, 2, 2, 3, 3, 4]]
    assert layout.offset.tolist() == [[0, 1, 0, 1, 0, 1, 0, 1, 0]]
    assert layout.n_blocks == 5


def test_block_layout_truncated_document_starts_a_block():
    # The row starts inside a document at position 5 (B = 4): 5, 6, 7 form a short block.
    pos = torch.tensor([[5, 6, 7, 8, 0, 1]])
    layout = block_layout(1, 6, block_size=4, positions=pos)
    assert layout.is_start.tolist() == [[True, False, False, True, True, False]]
    assert layout.index.tolist() == [[0, 0, 0, 1, 2, 2]]
    assert layout.offset.tolist() == [[1, 2, 3, 0, 0, 1]]


def test_per_token_t_hand_cases():
    t = torch.tensor([[0.1, 0.2, 0.3]])
    expected = [[0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.3]]
    torch.testing.assert_close(per_token_t(t, seq_len=7, block_size=3), torch.tensor(expected))
    torch.testing.assert_close(
        per_token_t(torch.tensor([0.4, 0.6]), seq_len=2, block_size=3),
        torch.tensor([[0.4, 0.4], [0.6, 0.6]]),
    )
    # Packed: documents 4, 2, 3 with B = 2 -> global blocks 0 0 1 1 2 2 3 3 4; extra columns unused.
    t = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.9]])
    out = per_token_t(t, seq_len=9, block_size=2, positions=positions_from_lengths([4, 2, 3]))
    torch.testing.assert_close(out, torch.tensor([[0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5]]))


def test_per_token_t_bad_block_count():
    with pytest.raises(ValueError, match="n_blocks"):
        per_token_t(torch.rand(1, 2), seq_len=7, block_size=3)
    with pytest.raises(ValueError, match="n_blocks"):
        per_token_t(
            torch.rand(1, 4), seq_len=9, block_size=2, positions=positions_from_lengths([4, 2, 3])
        )


# --- mask probability


def test_mask_probability_hand_cases():
    layout = block_layout(1, 4, block_size=4)
    p = mask_probability(
        torch.full((1, 4), 0.5), layout, block_size=4, position_dependent=True, skew=1.0
    )
    # w = (2q - 3) / 3 = [-1, -1/3, 1/3, 1], amplitude min(0.5, 0.5) = 0.5.
    torch.testing.assert_close(p, torch.tensor([[0.0, 1 / 3, 2 / 3, 1.0]]))
    p = mask_probability(
        torch.full((1, 4), 0.8), layout, block_size=4, position_dependent=True, skew=0.5
    )
    # amplitude 0.5 * min(0.8, 0.2) = 0.1.
    torch.testing.assert_close(p, torch.tensor([[0.7, 0.8 - 0.1 / 3, 0.8 + 0.1 / 3, 0.9]]))
    p = mask_probability(
        torch.full((1, 4), 0.8),
        layout,
        block_size=4,
        position_dependent=True,
        token_shift=True,
        skew=0.5,
    )
    # With shift the maskable slots are offsets 1..3 (m = 3): w = [-1, 0, 1].
    torch.testing.assert_close(p, torch.tensor([[0.0, 0.7, 0.8, 0.9]]))
    p = mask_probability(torch.full((1, 4), 0.3), layout, block_size=4, token_shift=True)
    torch.testing.assert_close(p, torch.tensor([[0.0, 0.3, 0.3, 0.3]]))


@FAST
@given(
    t=st.floats(0.0, 1.0),
    block_size=st.integers(2, 64),
    skew=st.floats(0.0, 1.0),
    token_shift=st.booleans(),
)
def test_position_dependent_probability_keeps_mean_and_range(t, block_size, skew, token_shift):
    layout = block_layout(1, block_size, block_size=block_size)
    t_tok = torch.full((1, block_size), t, dtype=torch.float64)
    p = mask_probability(
        t_tok,
        layout,
        block_size=block_size,
        position_dependent=True,
        token_shift=token_shift,
        skew=skew,
    )[0]
    assert bool((p >= 0).all()) and bool((p <= 1).all())
    maskable = p[1:] if token_shift else p
    if maskable.numel():
        assert maskable.mean().item() == pytest.approx(t, abs=1e-12)
    if token_shift:
        assert p[0].item() == 0.0
    # Strictly rising for 0 < t < 1 and skew > 0 (bounds keep the steps above float64 resolution).
    if 1e-6 <= t <= 1 - 1e-6 and skew >= 1e-3 and maskable.numel() > 1:
        assert bool((maskable[1:] > maskable[:-1]).all()), "probability must rise with the position"


def test_position_dependent_short_block_hand_cases():
    # t = 0.5, B = 8, token shift, L = 10: blocks of 8 and 2 tokens. The short block's one maskable
    # slot (m = 1) gets p = t, not the first slot of the 7-slot profile (which would be 0.25).
    layout = block_layout(1, 10, block_size=8)
    p = mask_probability(
        torch.full((1, 10), 0.5, dtype=torch.float64),
        layout,
        block_size=8,
        position_dependent=True,
        token_shift=True,
    )[0]
    assert p[8].item() == 0.0 and p[9].item() == 0.5
    assert p[1:8].mean().item() == pytest.approx(0.5, abs=1e-12)
    # No shift, L = 11, B = 8, skew 1, t = 0.5: the 3-token last block has m = 3, w = [-1, 0, 1],
    # amplitude 0.5 -> [0, 0.5, 1].
    p = mask_probability(
        torch.full((1, 11), 0.5, dtype=torch.float64),
        block_layout(1, 11, block_size=8),
        block_size=8,
        position_dependent=True,
        skew=1.0,
    )[0]
    torch.testing.assert_close(p[8:], torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    # Packed: documents 5 and 3 with B = 4, shift, t = 0.8, skew 0.5 (amplitude 0.1). Blocks:
    # [0..3] m = 3 -> [0, 0.7, 0.8, 0.9]; [4] m = 0 -> [0]; [0..2] m = 2 -> [0, 0.7, 0.9].
    p = mask_probability(
        torch.full((1, 8), 0.8, dtype=torch.float64),
        block_layout(1, 8, block_size=4, positions=positions_from_lengths([5, 3])),
        block_size=4,
        position_dependent=True,
        token_shift=True,
    )[0]
    expected = [0.0, 0.7, 0.8, 0.9, 0.0, 0.0, 0.7, 0.9]
    torch.testing.assert_close(p, torch.tensor(expected, dtype=torch.float64))
    # A truncated document (the row starts at position 5, B = 4): its first block holds positions
    # 5..7 only; without shift m = 3 -> [0.7, 0.8, 0.9] (profile over the tokens present).
    p = mask_probability(
        torch.full((1, 4), 0.8, dtype=torch.float64),
        block_layout(1, 4, block_size=4, positions=torch.tensor([[5, 6, 7, 8]])),
        block_size=4,
        position_dependent=True,
    )[0]
    torch.testing.assert_close(p, torch.tensor([0.7, 0.8, 0.9, 0.8], dtype=torch.float64))


@st.composite
def packed_positions(draw):
    """Rows of packed documents (lengths any), optionally starting inside a truncated document."""
    block_size = draw(st.integers(1, 9))
    batch = draw(st.integers(1, 3))
    seq_len = draw(st.integers(1, 30))
    rows = []
    for _ in range(batch):
        lengths, left = [], seq_len
        while left:
            n = draw(st.integers(1, left))
            lengths.append(n)
            left -= n
        row = positions_from_lengths(lengths)
        row[: lengths[0]] += draw(st.integers(0, 2 * block_size))  # truncated first document
        rows.append(row)
    return block_size, torch.stack(rows)


@FAST
@given(
    data=packed_positions(),
    packed=st.booleans(),
    token_shift=st.booleans(),
    skew=st.floats(1e-3, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_position_dependent_every_block_keeps_its_mean(data, packed, token_shift, skew, seed):
    # Every block -- full, or short at a row's or a document's edge -- has mean exactly its own t
    # over its maskable slots, probabilities in [0, 1], strictly rising inside the block.
    block_size, positions = data
    batch, seq_len = positions.shape
    pos = positions if packed else None
    layout = block_layout(batch, seq_len, block_size=block_size, positions=pos)
    t = sample_t(batch, n_blocks=layout.n_blocks, lo=1e-3, generator=gen(seed)).double()
    t_tok = torch.gather(t, 1, layout.index.contiguous())
    p = mask_probability(
        t_tok,
        layout,
        block_size=block_size,
        position_dependent=True,
        token_shift=token_shift,
        skew=skew,
    )
    assert bool((p >= 0).all()) and bool((p <= 1).all())
    for r in range(batch):
        for k in range(int(layout.index[r, -1]) + 1):
            in_block = (layout.index[r] == k).nonzero().flatten()
            assert bool((in_block[1:] == in_block[:-1] + 1).all()), "blocks are contiguous"
            maskable = in_block[1:] if token_shift else in_block
            if token_shift:
                assert p[r, in_block[0]].item() == 0.0
            if maskable.numel() == 0:
                continue
            probs = p[r, maskable]
            assert probs.mean().item() == pytest.approx(t[r, k].item(), abs=1e-12)
            if probs.numel() > 1 and t[r, k].item() < 1 - 1e-6:
                assert bool((probs[1:] > probs[:-1]).all()), "probability rises with the position"


def test_position_dependent_masking_empirical_mean_and_order():
    # 2000 rows x 4 blocks of 8 tokens, t = 0.3 per sequence, skew 0.5.
    batch, block, seq_len, t = 2000, 8, 32, 0.3
    x0 = torch.zeros(batch, seq_len, dtype=torch.long)
    _, masked = mask_tokens(
        x0,
        torch.full((batch,), t),
        block_size=block,
        mask_id=9,
        position_dependent=True,
        generator=gen(5),
    )
    # Overall rate: N = 64000 Bernoulli draws whose probabilities average t, so the std of the mean
    # is at most sqrt(t (1 - t) / N) = 0.0018; 5 std = 0.0091.
    n = masked.numel()
    assert abs(masked.float().mean().item() - t) < 5 * math.sqrt(t * (1 - t) / n)
    # Each of the 8 slots: 8000 draws; its rate lies within 5 std of its exact probability, and the
    # slots' exact probabilities are 0.043 apart (0.15 * 2 / 7), so the empirical rates rise too.
    per_slot = masked.float().view(batch, seq_len // block, block).mean(dim=(0, 1))
    exact = mask_probability(
        torch.full((1, block), t),
        block_layout(1, block, block_size=block),
        block_size=block,
        position_dependent=True,
    )[0]
    draws = batch * seq_len // block
    for rate, p in zip(per_slot.tolist(), exact.tolist()):
        assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / draws)
    assert bool((per_slot[1:] > per_slot[:-1]).all())


# --- mask_tokens


def test_mask_tokens_extremes():
    x0 = torch.arange(1, 13).view(2, 6)
    x_t, masked = mask_tokens(x0, torch.zeros(2), block_size=3, mask_id=0, generator=gen())
    assert not masked.any() and torch.equal(x_t, x0)
    x_t, masked = mask_tokens(x0, torch.ones(2), block_size=3, mask_id=0, generator=gen())
    assert masked.all() and bool((x_t == 0).all())
    x_t, masked = mask_tokens(
        x0, torch.ones(2), block_size=3, mask_id=0, token_shift=True, generator=gen()
    )
    assert masked.tolist() == [[False, True, True, False, True, True]] * 2
    assert torch.equal(x_t[:, [0, 3]], x0[:, [0, 3]])


def test_mask_tokens_per_block_t_hand_case():
    # Blocks of 2: t = 1, 0, 1 -> exactly blocks 0 and 2 are masked.
    x0 = torch.arange(1, 7).view(1, 6)
    _, masked = mask_tokens(
        x0, torch.tensor([[1.0, 0.0, 1.0]]), block_size=2, mask_id=0, generator=gen()
    )
    assert masked.tolist() == [[True, True, False, False, True, True]]
    # Packed, documents 3, 3 with B = 2 -> global blocks 0 0 1 | 2 2 3.
    pos = positions_from_lengths([3, 3])
    t = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    _, masked = mask_tokens(x0, t, block_size=2, mask_id=0, positions=pos, generator=gen())
    assert masked.tolist() == [[True, True, False, False, False, True]]


def test_mask_tokens_is_reproducible_and_uses_only_its_generator():
    x0 = torch.randint(1, 50, (3, 20), generator=gen(0))
    t = torch.tensor([0.2, 0.5, 0.9])
    torch.manual_seed(0)
    a = mask_tokens(x0, t, block_size=4, mask_id=0, generator=gen(11))
    torch.manual_seed(1)
    b = mask_tokens(x0, t, block_size=4, mask_id=0, generator=gen(11))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@st.composite
def packed_batches(draw):
    block_size = draw(st.integers(1, 6))
    batch = draw(st.integers(1, 3))
    seq_len = draw(st.integers(1, 24))
    rows = []
    for _ in range(batch):
        lengths, left = [], seq_len
        while left:
            n = draw(st.integers(1, left))
            lengths.append(n)
            left -= n
        rows.append(positions_from_lengths(lengths))
    return block_size, torch.stack(rows)


@FAST
@given(
    data=packed_batches(),
    packed=st.booleans(),
    per_block=st.booleans(),
    position_dependent=st.booleans(),
    token_shift=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_mask_tokens_properties(data, packed, per_block, position_dependent, token_shift, seed):
    block_size, positions = data
    batch, seq_len = positions.shape
    g = gen(seed)
    x0 = torch.randint(0, 100, (batch, seq_len), generator=g)
    pos = positions if packed else None
    layout = block_layout(batch, seq_len, block_size=block_size, positions=pos)
    n_blocks = layout.n_blocks + (2 if packed else 0)  # packed rows accept spare columns
    t = sample_t(batch, n_blocks=n_blocks if per_block else None, generator=g)
    x_t, masked = mask_tokens(
        x0,
        t,
        block_size=block_size,
        mask_id=100,
        position_dependent=position_dependent,
        token_shift=token_shift,
        positions=pos,
        generator=g,
    )
    assert masked.dtype == torch.bool and masked.shape == x0.shape
    assert torch.equal(masked, x_t == 100), "masked positions are exactly where x_t == mask_id"
    assert torch.equal(x_t[~masked], x0[~masked])
    if token_shift:
        assert not bool((masked & layout.is_start).any()), (
            "token_shift never masks a block's first token"
        )
        # Also with t = 1: everything but the block starts is masked.
        _, all_masked = mask_tokens(
            x0,
            torch.ones(batch),
            block_size=block_size,
            mask_id=100,
            token_shift=True,
            positions=pos,
            position_dependent=position_dependent,
            generator=g,
        )
        assert torch.equal(all_masked, ~layout.is_start)


@pytest.mark.parametrize(
    "t, kwargs, name",
    [
        (torch.full((2,), 0.5), {"block_size": 0}, "block_size"),
        (torch.full((2,), 1.5), {}, "t must lie in"),
        (torch.full((2,), -0.1), {}, "t must lie in"),
        (torch.full((3,), 0.5), {}, "t must have shape"),
        (torch.full((2, 3), 0.5), {}, "n_blocks"),
        (torch.full((2,), 0.5), {"mask_id": 5}, "mask_id"),
        (torch.full((2,), 0.5), {"position_dependent": True, "skew": 2.0}, "skew"),
        (torch.full((2,), 0.5), {"positions": torch.tensor([0, 1, 2])}, "positions"),
    ],
)
def test_mask_tokens_bad_arguments(t, kwargs, name):
    x0 = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    args = {"block_size": 2, "mask_id": 0, "generator": gen()} | kwargs
    with pytest.raises(ValueError, match=name):
        mask_tokens(x0, t, **args)


def test_mask_tokens_requires_a_generator_and_integer_ids():
    with pytest.raises(ValueError, match="generator"):
        mask_tokens(torch.ones(1, 4, dtype=torch.long), torch.ones(1), block_size=2, mask_id=0)
    with pytest.raises(ValueError, match="x0"):
        mask_tokens(torch.ones(1, 4), torch.ones(1), block_size=2, mask_id=0, generator=gen())
