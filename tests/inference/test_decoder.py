"""BlockDecoder and ARDecoder against the training forward, each other, and themselves (cache, batch)."""

from __future__ import annotations

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


def training_block_logits(model, x_t, x0, k):
    from nbdiff_megatron.model.builder import nbdiff_forward

    with torch.no_grad():
        logits = nbdiff_forward(model, x_t, x0, block_size=B, backend="sdpa")
    return logits[:, k * B : (k + 1) * B]


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


@pytest.mark.parametrize("options", CONFIGS[:3])
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
    decoder = BlockDecoder(tiny_model, mask_id=MASK_ID, block_size=8, max_new_tokens=32)
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
