"""BlockDecoder and ARDecoder against the training forward, each other, and themselves (cache, batch)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from nbdiff_megatron.errors import InferenceError
from nbdiff_megatron.inference import (
    ARDecoder,
    BlockDecoder,
    DecodeConfig,
    SamplingConfig,
    UnmaskingConfig,
)

B = 8
VOCAB = 48  # conftest.build_tiny's vocabulary
MASK_ID = VOCAB - 1
EOS_ID = 0


def random_tokens(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, MASK_ID, shape, generator=gen)


def noised(x0, seed, p=0.5):
    gen = torch.Generator().manual_seed(seed)
    masked = torch.rand(x0.shape, generator=gen) < p
    return torch.where(masked, torch.full_like(x0, MASK_ID), x0)


def training_logits(model, x_t, x0, kind="context_causal"):
    """Logits [b, 2L, V] of the x_t ⊕ x_0 training forward (docs/METHOD.md §3) with blocks of B."""
    from nbdiff_megatron.model.builder import nbdiff_forward

    with torch.no_grad():
        return nbdiff_forward(model, x_t, x0, block_size=B, kind=kind, backend="sdpa")


def training_block_logits(model, x_t, x0, k, kind="context_causal"):
    """x_t logits of block k (short when it is the last block of a sequence of L % B != 0)."""
    return training_logits(model, x_t, x0, kind)[:, k * B : min((k + 1) * B, x0.shape[1])]


@pytest.mark.parametrize("use_cache", [True, False])
def test_block_logits_equal_training_forward(tiny_model, use_cache):
    """Decoder logits of block k == x_t-block-k logits of the 2L training forward (fp32, 1e-5)."""
    L, k = 32, 2
    x0 = random_tokens((2, L), 0)
    x_t = noised(x0, 1)
    expected = training_block_logits(tiny_model, x_t, x0, k)
    decoder = BlockDecoder(
        tiny_model, mask_id=MASK_ID, eos_ids=[EOS_ID], block_size=B, use_cache=use_cache
    )
    # prefix encoded by one prefill
    session = decoder.start(x0[:, : k * B])
    session.prefill()
    got = session.block_logits(x_t[:, k * B : (k + 1) * B])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # prefix encoded block by block through commits
    session = decoder.start(x0[:, :B])
    session.prefill()
    for j in range(1, k):
        session.commit(x0[:, j * B : (j + 1) * B])
    got = session.block_logits(x_t[:, k * B : (k + 1) * B])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_block_logits_with_left_padding_equal_training_forward(gqa_model):
    """A row left-padded in a batch gets the logits of its own unpadded training forward."""
    L = 32
    long_x0, short_x0 = random_tokens((1, L), 2), random_tokens((1, L), 3)
    long_xt, short_xt = noised(long_x0, 4), noised(short_x0, 5)
    decoder = BlockDecoder(gqa_model, mask_id=MASK_ID, block_size=B)
    session = decoder.start([long_x0[0, : 3 * B].tolist(), short_x0[0, :B].tolist()])
    assert session.layout.pads == [0, 2 * B]
    session.prefill()
    # the long row decodes its block 3, the short row its block 1, in the same columns
    block = torch.cat([long_xt[:, 3 * B : 4 * B], short_xt[:, B : 2 * B]])
    got = session.block_logits(block)
    torch.testing.assert_close(
        got[:1], training_block_logits(gqa_model, long_xt, long_x0, 3), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        got[1:], training_block_logits(gqa_model, short_xt, short_x0, 1), rtol=0, atol=1e-5
    )


def test_b1_with_token_shift_equals_ar_greedy(tiny_model):
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    block = BlockDecoder(
        tiny_model,
        mask_id=MASK_ID,
        eos_ids=[EOS_ID],
        block_size=1,
        token_shift=True,
        max_new_tokens=12,
    )
    ar = ARDecoder(tiny_model, eos_ids=[EOS_ID], mask_id=MASK_ID, max_new_tokens=12)
    out_block, out_ar = block.generate(prompts), ar.generate(prompts)
    assert out_block.tokens == out_ar.tokens
    assert out_block.stop_reasons == out_ar.stop_reasons
    assert out_block.stats.forward_passes == out_ar.stats.forward_passes
    assert all(len(t) == 12 for t in out_ar.tokens)


def test_ar_cache_equals_recompute(tiny_model):
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    ar = ARDecoder(tiny_model, eos_ids=[EOS_ID], mask_id=MASK_ID, max_new_tokens=10)
    assert ar.generate(prompts).tokens == ar.generate(prompts, use_cache=False).tokens


CONFIGS = [
    dict(block_size=8),
    dict(block_size=8, sub_block_size=4, unmasking=UnmaskingConfig("confidence", 0.7)),
    dict(block_size=4, token_shift=False, unmasking=UnmaskingConfig("entropy", 1.0)),
    dict(block_size=8, unmasking=UnmaskingConfig("margin", 0.5)),
    dict(block_size=8, unmasking=UnmaskingConfig("topk", k=3)),
    dict(block_size=4, mask_kind="block_causal", unmasking=UnmaskingConfig("confidence", 0.5)),
]


@pytest.mark.parametrize("options", CONFIGS)
def test_cache_equals_recompute(tiny_model, options):
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22]]
    decoder = BlockDecoder(
        tiny_model, mask_id=MASK_ID, eos_ids=[EOS_ID], max_new_tokens=20, **options
    )
    cached, recomputed = decoder.generate(prompts), decoder.generate(prompts, use_cache=False)
    assert cached.tokens == recomputed.tokens
    assert cached.stats.forward_passes == recomputed.stats.forward_passes


@pytest.mark.parametrize("options", CONFIGS[:3] + CONFIGS[-1:])
def test_batched_equals_one_by_one(tiny_model, options):
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], list(range(1, 17))]
    decoder = BlockDecoder(
        tiny_model, mask_id=MASK_ID, eos_ids=[EOS_ID], max_new_tokens=18, **options
    )
    batched = decoder.generate(prompts)
    for i, prompt in enumerate(prompts):
        single = decoder.generate([prompt])
        assert single.tokens[0] == batched.tokens[i]
        assert single.stop_reasons[0] == batched.stop_reasons[i]


def test_parallel_unmasking_saves_forwards(tiny_model):
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10]]
    decoder = BlockDecoder(
        tiny_model, mask_id=MASK_ID, block_size=8, max_new_tokens=32, fused_commit=False
    )
    loose = decoder.generate(prompts, unmasking=UnmaskingConfig("confidence", 0.3))
    strict = decoder.generate(prompts, unmasking=UnmaskingConfig("confidence", 1.0))
    # threshold 1.0 unmasks one token per step: 7 refinement steps + 1 commit per block of 8 (the
    # first token is the AR prediction), the last block has no commit, plus the prefill
    assert strict.stats.forward_passes == 1 + 4 * 8 - 1
    assert strict.stats.tokens_per_forward == pytest.approx(32 / 32)
    assert loose.stats.forward_passes < strict.stats.forward_passes
    assert loose.stats.tokens_per_forward > 1.0
    assert len(loose.tokens[0]) == 32 and MASK_ID not in loose.tokens[0]


def test_eos_stops_a_row(tiny_model):
    decoder = BlockDecoder(tiny_model, mask_id=MASK_ID, block_size=4, max_new_tokens=16)
    prompt = [[3, 4, 5, 6, 7]]
    free = decoder.generate(prompt).tokens[0]
    eos = free[5]  # declare the 6th generated token an EOS: the row must stop there
    stopped = BlockDecoder(
        tiny_model, mask_id=MASK_ID, eos_ids=[eos], block_size=4, max_new_tokens=16
    ).generate(prompt)
    first = free.index(eos)
    assert stopped.tokens[0] == free[:first]
    assert stopped.stop_reasons == ["eos"]


def test_sampling_is_reproducible_and_streams(tiny_model):
    decoder = BlockDecoder(
        tiny_model,
        mask_id=MASK_ID,
        block_size=4,
        max_new_tokens=12,
        sampling=SamplingConfig(temperature=1.0, top_p=0.9),
        seed=7,
    )
    streamed: list[int] = []
    first = decoder.generate([[3, 4, 5]], callback=lambda k, new: streamed.extend(new[0]))
    second = decoder.generate([[3, 4, 5]])
    assert first.tokens == second.tokens
    assert streamed == first.tokens[0]
    assert len(first.tokens[0]) == 12


def test_context_limit_stops_generation(tiny_model):
    decoder = BlockDecoder(tiny_model, mask_id=MASK_ID, block_size=8, max_new_tokens=100)
    out = decoder.generate([list(range(1, 61))])  # seq_length 64: 4 positions left
    assert len(out.tokens[0]) == 4 and out.stop_reasons == ["context"]


def test_user_errors(tiny_model):
    decoder = BlockDecoder(tiny_model, mask_id=MASK_ID, block_size=8)
    with pytest.raises(InferenceError, match="empty"):
        decoder.generate([[]])
    with pytest.raises(InferenceError, match="no prompts"):
        decoder.generate([])
    with pytest.raises(InferenceError, match="context is 64"):
        decoder.generate([list(range(1, 40)) * 2])
    with pytest.raises(InferenceError, match="context is 64"):
        ARDecoder(tiny_model).generate([[1] * 64])
    with pytest.raises(InferenceError, match="sub_block_size"):
        DecodeConfig(block_size=32, sub_block_size=5)
    assert VOCAB > MASK_ID


def test_stop_predicate_ends_a_row_after_its_block(tiny_model):
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10], [20, 21, 22, 23, 24, 25, 26, 27]]
    decoder = BlockDecoder(tiny_model, mask_id=MASK_ID, block_size=4, max_new_tokens=16)
    free = decoder.generate(prompts)
    out = decoder.generate(prompts, stop=lambda row, ids: row == 0 and len(ids) >= 5)
    # row 0 stops at the end of the block in which it passed 5 tokens; row 1 is untouched
    assert out.stop_reasons == ["stop", "length"]
    assert out.tokens[0] == free.tokens[0][:8]
    assert out.tokens[1] == free.tokens[1]
    ar = ARDecoder(tiny_model, mask_id=MASK_ID, max_new_tokens=16)
    ar_out = ar.generate(prompts, stop=lambda row, ids: len(ids) >= 3)
    assert [len(t) for t in ar_out.tokens] == [3, 3] and ar_out.stop_reasons == ["stop", "stop"]


# ------------------------------------------------ training-vs-decoder consistency, more layouts
@pytest.mark.parametrize("use_cache", [True, False])
def test_prompt_tail_in_the_first_active_block_equals_training_forward(tiny_model_fp64, use_cache):
    """A prompt of k*B + 3 tokens: its tail is fixed (unmasked) x_t in block k, as in training.

    Run in fp64 (atol 1e-10): in fp32 this case differs by 1.01e-5 at logits of magnitude 7.5
    (summation order over 24 vs 64 keys; fp64 gives 1.5e-14), just above the 1e-5 used elsewhere.
    """
    tiny_model = tiny_model_fp64
    L, k, tail = 32, 2, 3
    x0 = random_tokens((2, L), 10)
    x_t = noised(x0, 11)
    x_t[:, k * B : k * B + tail] = x0[:, k * B : k * B + tail]  # the prompt tail is never masked
    expected = training_block_logits(tiny_model, x_t, x0, k)
    decoder = BlockDecoder(
        tiny_model, mask_id=MASK_ID, eos_ids=[EOS_ID], block_size=B, use_cache=use_cache
    )
    session = decoder.start(x0[:, : k * B + tail])
    assert session.layout.first_block == k * B
    # the tail sits in the first active block's columns; the prefill covers whole blocks only
    assert torch.equal(session.tokens[:, k * B : k * B + tail], x0[:, k * B : k * B + tail])
    session.prefill()
    assert session.cursor == k * B
    got = session.block_logits(x_t[:, k * B : (k + 1) * B])
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("use_cache", [True, False])
def test_short_last_block_equals_training_forward(tiny_model, use_cache):
    """L = 3B + 3: the last block has 3 tokens; cached blocks committed one by one, then either a
    3-column forward or the decoder's own layout (a B-column block whose last columns lie beyond
    the row's budget) give the training forward's logits of that short block."""
    k, short = 3, 3
    L = k * B + short
    x0 = random_tokens((2, L), 12)
    x_t = noised(x0, 13)
    expected = training_block_logits(tiny_model, x_t, x0, k)
    assert expected.shape[1] == short
    decoder = BlockDecoder(
        tiny_model, mask_id=MASK_ID, eos_ids=[EOS_ID], block_size=B, use_cache=use_cache
    )
    session = decoder.start(x0[:, :B])
    session.prefill()
    for j in range(1, k):
        session.commit(x0[:, j * B : (j + 1) * B])
    got = session.block_logits(x_t[:, k * B :])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # generate()'s layout: the budget ends 3 tokens into block k, later columns are invalid
    session = decoder.start(x0[:, : k * B], replace(decoder.config, max_new_tokens=short))
    assert session.num_columns == (k + 1) * B
    session.prefill()
    block = torch.full((2, B), MASK_ID)
    block[:, :short] = x_t[:, k * B :]
    got = session.block_logits(block)[:, :short]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_token_shift_proposal_uses_the_row_the_loss_scores(tiny_model):
    """With token shift the greedy proposal for position j of the active block is the argmax of the
    x_t logit at j - 1 of the same block -- the row nbdiff_loss scores for a masked token j -- and
    the block's first token is the argmax of the x_0 logit at kB - 1 (its L_AR row)."""
    from nbdiff_megatron.method.losses import nbdiff_loss

    k = 2
    L = (k + 1) * B
    prompt = random_tokens((1, k * B), 14)
    # threshold 0: every masked position is unmasked at the first refinement step, so each token
    # is the proposal made from the block [first token, MASK, ..., MASK]
    out = BlockDecoder(
        tiny_model,
        mask_id=MASK_ID,
        block_size=B,
        max_new_tokens=B,
        unmasking=UnmaskingConfig("confidence", 0.0),
    ).generate(prompt)
    y = torch.tensor(out.tokens)
    assert y.shape == (1, B) and out.stats.forward_passes == 2  # prefill + one refinement step
    x0 = torch.cat([prompt, y], dim=1)
    x_t = x0.clone()
    x_t[:, k * B + 1 :] = MASK_ID
    logits = training_logits(tiny_model, x_t, x0)
    no_mask = logits.clone()
    no_mask[..., MASK_ID] = float("-inf")
    assert int(no_mask[0, L + k * B - 1].argmax()) == int(y[0, 0])
    for j in range(1, B):
        row = k * B + j - 1
        assert int(no_mask[0, row].argmax()) == int(y[0, j]), f"position {j}"
        # the loss scores masked token j with exactly that row: its L_MDM (t = 1, λ = 0) is the
        # cross-entropy of row kB + j - 1 for target y_j
        masked = torch.zeros(1, L, dtype=torch.bool)
        masked[0, k * B + j] = True
        terms = nbdiff_loss(
            logits, x0, masked, torch.ones(1, L), ar_weight=0.0, token_shift=True, block_size=B
        )
        expected = torch.nn.functional.cross_entropy(logits[0, row : row + 1], y[0, j : j + 1])
        torch.testing.assert_close(terms.mdm_sum, expected, rtol=0, atol=1e-6)
    # without shift the proposal for j is the argmax of the x_t logit at j itself
    out = BlockDecoder(
        tiny_model,
        mask_id=MASK_ID,
        block_size=B,
        max_new_tokens=B,
        token_shift=False,
        unmasking=UnmaskingConfig("confidence", 0.0),
    ).generate(prompt)
    y = torch.tensor(out.tokens)
    x0 = torch.cat([prompt, y], dim=1)
    x_t = x0.clone()
    x_t[:, k * B :] = MASK_ID
    no_mask = training_logits(tiny_model, x_t, x0)
    no_mask[..., MASK_ID] = float("-inf")
    assert no_mask[0, k * B : L].argmax(dim=-1).tolist() == y[0].tolist()


# ------------------------------------------------ block-causal checkpoints
@pytest.mark.parametrize("use_cache", [True, False])
def test_block_causal_block_logits_equal_training_forward(tiny_model, use_cache):
    """mask_kind="block_causal": committed blocks are encoded bidirectionally inside each block, so
    the decoder's logits of block k equal the x_t logits of the block-causal training forward."""
    from nbdiff_megatron.method.masks import training_mask

    L, k = 32, 3
    # the training masks differ only in the x_0 half: block-causal sees later tokens of its block
    cc, bc = training_mask(L, B, "context_causal"), training_mask(L, B, "block_causal")
    assert torch.equal(cc[:L], bc[:L]) and not torch.equal(cc[L:, L:], bc[L:, L:])
    x0 = random_tokens((2, L), 20)
    x_t = noised(x0, 21)
    expected = training_block_logits(tiny_model, x_t, x0, k, kind="block_causal")
    decoder = BlockDecoder(
        tiny_model,
        mask_id=MASK_ID,
        block_size=B,
        use_cache=use_cache,
        mask_kind="block_causal",
    )
    session = decoder.start(x0[:, : k * B])  # prefill: block-causal over the prompt's blocks
    prefill = session.prefill()
    torch.testing.assert_close(
        session.block_logits(x_t[:, k * B : (k + 1) * B]), expected, rtol=0, atol=1e-5
    )
    # the prefill's logits are the block-causal x_0 half's
    x0_logits = training_logits(tiny_model, x_t, x0, "block_causal")[:, L : L + k * B]
    torch.testing.assert_close(prefill, x0_logits, rtol=0, atol=1e-5)
    session = decoder.start(x0[:, :B])  # one block prefilled, the others committed
    session.prefill()
    for j in range(1, k):
        committed = session.commit(x0[:, j * B : (j + 1) * B])
        torch.testing.assert_close(committed, x0_logits[:, j * B : (j + 1) * B], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        session.block_logits(x_t[:, k * B : (k + 1) * B]), expected, rtol=0, atol=1e-5
    )
    # a context-causal decoder would not match this model's training forward
    causal = BlockDecoder(tiny_model, mask_id=MASK_ID, block_size=B, use_cache=use_cache)
    session = causal.start(x0[:, : k * B])
    session.prefill()
    got = session.block_logits(x_t[:, k * B : (k + 1) * B])
    assert (got - expected).abs().max() > 1e-3


def test_block_causal_left_padding_and_generation(gqa_model):
    """Block-causal with a left-padded row: each row matches its own training forward; generation
    with the cache equals recomputation."""
    L = 32
    long_x0, short_x0 = random_tokens((1, L), 22), random_tokens((1, L), 23)
    long_xt, short_xt = noised(long_x0, 24), noised(short_x0, 25)
    decoder = BlockDecoder(gqa_model, mask_id=MASK_ID, block_size=B, mask_kind="block_causal")
    session = decoder.start([long_x0[0, : 3 * B].tolist(), short_x0[0, :B].tolist()])
    assert session.layout.pads == [0, 2 * B]
    session.prefill()
    got = session.block_logits(torch.cat([long_xt[:, 3 * B :], short_xt[:, B : 2 * B]]))
    for row, (x_t, x0, k) in enumerate([(long_xt, long_x0, 3), (short_xt, short_x0, 1)]):
        expected = training_block_logits(gqa_model, x_t, x0, k, kind="block_causal")
        torch.testing.assert_close(got[row : row + 1], expected, rtol=0, atol=1e-5)
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22]]
    cached = decoder.generate(prompts, max_new_tokens=20)
    recomputed = decoder.generate(prompts, max_new_tokens=20, use_cache=False)
    assert cached.tokens == recomputed.tokens
    assert all(len(t) == 20 for t in cached.tokens)


def test_mask_kind_is_validated():
    with pytest.raises(InferenceError, match="mask_kind"):
        DecodeConfig(mask_kind="annealed")
