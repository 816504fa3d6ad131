"""Block alignment, EOS inside a block, scheduled / entropy-bounded unmasking, top-k sampling.

Every mode that claims exactness is checked against a training forward laid out the same way
(docs/METHOD.md §3), the pattern of test_decoder.py.
"""

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
VOCAB = 48
MASK_ID = VOCAB - 1
EOS_ID = 0


def random_tokens(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, MASK_ID, shape, generator=gen)


def offset_training_mask(length: int, block: int, origin: int, kind: str) -> torch.Tensor:
    """The 2L x 2L training mask of docs/METHOD.md §3 (written out from its table) with blocks that start
    at position `origin` (and count backwards before it): blk(i) = floor((i - origin) / B)."""
    idx = torch.arange(length)
    blk = torch.div(idx - origin, block, rounding_mode="floor")
    bq, bk = blk[:, None], blk[None, :]
    tt = bq == bk
    t0 = bk < bq
    c0 = (idx[None, :] <= idx[:, None]) if kind == "context_causal" else (bk <= bq)
    top = torch.cat([tt, t0], dim=1)
    bottom = torch.cat([torch.zeros_like(c0), c0], dim=1)
    return torch.cat([top, bottom], dim=0)


def prompt_aligned_training_logits(model, x_t, x0, origin, kind):
    from nbdiff_megatron.model.attention import AttentionMask

    length = x0.shape[1]
    allowed = offset_training_mask(length, B, origin, kind)
    pos = torch.arange(length).repeat(2).expand(x0.shape[0], 2 * length)
    with torch.no_grad():
        return model(torch.cat([x_t, x0], dim=1), pos, AttentionMask.dense(allowed))


# ------------------------------------------------------------------------- block alignment
@pytest.mark.parametrize("kind", ["context_causal", "block_causal"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_prompt_aligned_blocks_equal_training_forward(tiny_model_fp64, kind, use_cache):
    """--block-align prompt: with a prompt of 2B + 3 tokens the blocks start at position 2B + 3; the
    decoder's logits of generated blocks 0 and 1 equal the x_t logits of a training forward whose
    blocks start there (the prompt, in blocks counted backwards for block_causal, is clean x_0)."""
    model = tiny_model_fp64
    prompt_len = 2 * B + 3
    length = prompt_len + 2 * B
    x0 = random_tokens((2, length), 30)
    x_t = x0.clone()
    gen = torch.Generator().manual_seed(31)
    x_t[:, prompt_len:] = torch.where(
        torch.rand((2, 2 * B), generator=gen) < 0.6, MASK_ID, x0[:, prompt_len:]
    )
    logits = prompt_aligned_training_logits(model, x_t, x0, prompt_len, kind)
    decoder = BlockDecoder(
        model,
        mask_id=MASK_ID,
        block_size=B,
        use_cache=use_cache,
        mask_kind=kind,
        block_align="prompt",
    )
    session = decoder.start(x0[:, :prompt_len])
    assert session.layout.first_block == prompt_len and session.layout.pads == [0, 0]
    prefill = session.prefill()
    torch.testing.assert_close(prefill, logits[:, length : length + prompt_len], rtol=0, atol=1e-10)
    for k in range(2):
        cols = slice(prompt_len + k * B, prompt_len + (k + 1) * B)
        got = session.block_logits(x_t[:, cols])
        torch.testing.assert_close(got, logits[:, cols], rtol=0, atol=1e-10)
        committed = session.commit(x0[:, cols])
        x0_cols = slice(length + cols.start, length + cols.stop)
        torch.testing.assert_close(committed, logits[:, x0_cols], rtol=0, atol=1e-10)
    # document alignment lays the same prompt out differently: other logits
    doc = BlockDecoder(model, mask_id=MASK_ID, block_size=B, mask_kind=kind)
    session = doc.start(x0[:, :prompt_len])
    assert session.layout.first_block == 2 * B


@pytest.mark.parametrize("kind", ["context_causal", "block_causal"])
def test_prompt_alignment_cache_batch_and_padding(gqa_model, kind):
    """Prompt-aligned generation: cache == recompute, batched (left-padded) == one by one, and the
    text differs from document alignment when the prompt length is not a multiple of B."""
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], list(range(1, 17))]
    decoder = BlockDecoder(
        gqa_model,
        mask_id=MASK_ID,
        block_size=B,
        max_new_tokens=18,
        mask_kind=kind,
        block_align="prompt",
        unmasking=UnmaskingConfig("confidence", 0.6),
    )
    batched = decoder.generate(prompts)
    assert batched.tokens == decoder.generate(prompts, use_cache=False).tokens
    for i, prompt in enumerate(prompts):
        assert decoder.generate([prompt]).tokens[0] == batched.tokens[i]
    document = decoder.generate(prompts, block_align="document")
    assert document.tokens[2] == batched.tokens[2] or kind == "block_causal"  # 16 = 2B: same layout
    assert document.tokens[0] != batched.tokens[0]


def test_block_align_is_validated():
    with pytest.raises(InferenceError, match="block_align"):
        DecodeConfig(block_align="left")


# ------------------------------------------------------------------------- EOS inside a block
def test_eos_stops_inside_the_block_without_further_forwards(tiny_model):
    """A row stops as soon as an EOS is decoded with nothing masked before it: same tokens as
    finishing the block, fewer forwards, and a token-shift EOS costs no refinement forward."""
    prompt = [[3, 4, 5, 6, 7, 8, 9, 10]]
    one_by_one = UnmaskingConfig("confidence", 1.0)  # one token per step, left to right-ish
    free = BlockDecoder(
        tiny_model, mask_id=MASK_ID, block_size=B, max_new_tokens=32, unmasking=one_by_one
    ).generate(prompt)
    tokens = free.tokens[0]
    # the first token of block 1 (token shift: the AR prediction) declared EOS
    eos = tokens[B]
    first = tokens.index(eos)
    out = BlockDecoder(
        tiny_model,
        mask_id=MASK_ID,
        eos_ids=[eos],
        block_size=B,
        max_new_tokens=32,
        unmasking=one_by_one,
    ).generate(prompt)
    assert out.tokens[0] == tokens[:first] and out.stop_reasons == ["eos"]
    if first == B:
        # prefill + block 0 (7 steps + commit); block 1's first token is EOS: no forward for it
        assert out.stats.forward_passes == 1 + 8
    # an EOS in the middle of a block: the block is not refined past it
    for eos_at in range(1, 3 * B):
        eos = tokens[eos_at]
        if eos not in tokens[:eos_at]:
            break
    out = BlockDecoder(
        tiny_model,
        mask_id=MASK_ID,
        eos_ids=[eos],
        block_size=B,
        max_new_tokens=32,
        unmasking=one_by_one,
    ).generate(prompt)
    assert out.tokens[0] == tokens[:eos_at] and out.stop_reasons == ["eos"]
    full_blocks = eos_at // B + 1
    assert out.stats.forward_passes < 1 + full_blocks * B


def test_eos_rows_stop_independently_in_a_batch(tiny_model):
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10], [20, 21, 22, 23, 24]]
    base = BlockDecoder(tiny_model, mask_id=MASK_ID, block_size=B, max_new_tokens=24)
    free = base.generate(prompts)
    eos = free.tokens[0][5]
    decoder = BlockDecoder(
        tiny_model, mask_id=MASK_ID, eos_ids=[eos], block_size=B, max_new_tokens=24
    )
    batched = decoder.generate(prompts)
    for i, prompt in enumerate(prompts):
        single = decoder.generate([prompt])
        assert single.tokens[0] == batched.tokens[i]
        assert single.stop_reasons == batched.stop_reasons[i : i + 1]
        cut = free.tokens[i].index(eos) if eos in free.tokens[i] else len(free.tokens[i])
        assert batched.tokens[i] == free.tokens[i][:cut]
    assert batched.stop_reasons[0] == "eos"
    # per-row forwards: a stopped row is not counted for the forwards after its EOS
    assert batched.stats.row_forward_passes < 2 * batched.stats.forward_passes


# ------------------------------------------------------------------------- unmasking rules
@pytest.mark.parametrize("steps", [1, 2, 4, 7])
def test_static_schedule_takes_exactly_the_planned_steps(tiny_model, steps):
    """--steps-per-block S: every block of B (B - 1 masked with token shift) takes min(S, B - 1)
    refinement steps, whatever the model predicts."""
    decoder = BlockDecoder(
        tiny_model,
        mask_id=MASK_ID,
        block_size=B,
        max_new_tokens=4 * B,
        unmasking=UnmaskingConfig("static", steps=steps),
        fused_commit=False,  # the release's schedule: one commit forward per block
    )
    out = decoder.generate([[3, 4, 5, 6, 7, 8, 9, 10]])
    # prefill + 4 blocks x (S steps + commit), no commit after the last block
    assert out.stats.forward_passes == 1 + 4 * (steps + 1) - 1
    assert len(out.tokens[0]) == 4 * B and MASK_ID not in out.tokens[0]
    # cache == recompute for the scheduled rule too
    assert decoder.generate([[3, 4, 5, 6, 7, 8, 9, 10]], use_cache=False).tokens == out.tokens


def test_static_schedule_with_sub_blocks_and_no_shift(tiny_model):
    decoder = BlockDecoder(
        tiny_model,
        mask_id=MASK_ID,
        block_size=B,
        sub_block_size=4,
        token_shift=False,
        max_new_tokens=2 * B,
        unmasking=UnmaskingConfig("static", steps=4),
        fused_commit=False,
    )
    out = decoder.generate([[3, 4, 5, 6, 7, 8, 9, 10]])
    # 2 sub-blocks of 4 masked tokens, 2 steps each: 4 steps per block
    assert out.stats.forward_passes == 1 + 2 * (4 + 1) - 1
    # fused (no token shift: never a miss): the commit runs the second block's first step
    fused = decoder.generate([[3, 4, 5, 6, 7, 8, 9, 10]], fused_commit=True)
    assert fused.tokens == out.tokens and fused.stats.fused_misses == 0
    assert fused.stats.forward_passes == 1 + 2 * 4
    with pytest.raises(InferenceError, match="multiple"):
        DecodeConfig(block_size=B, sub_block_size=4, unmasking=UnmaskingConfig("static", steps=3))


def test_dynamic_is_bounded_by_the_schedule_and_beats_it_with_confident_models(tiny_model):
    prompt = [[3, 4, 5, 6, 7, 8, 9, 10]]
    decoder = BlockDecoder(tiny_model, mask_id=MASK_ID, block_size=B, max_new_tokens=4 * B)
    static = decoder.generate(prompt, unmasking=UnmaskingConfig("static", steps=4))
    dynamic = decoder.generate(prompt, unmasking=UnmaskingConfig("dynamic", 0.5, steps=4))
    loose = decoder.generate(prompt, unmasking=UnmaskingConfig("dynamic", 0.0, steps=4))
    assert dynamic.stats.forward_passes <= static.stats.forward_passes
    # threshold 0: every masked token goes at the first step
    assert loose.stats.forward_passes == 1 + 4 * 2 - 1
    strict = decoder.generate(prompt, unmasking=UnmaskingConfig("dynamic", 1.0, steps=4))
    assert strict.tokens == static.tokens  # nothing passes 1.0: the minimum is the schedule


def test_entropy_bounded_budget(tiny_model):
    prompt = [[3, 4, 5, 6, 7, 8, 9, 10]]
    decoder = BlockDecoder(
        tiny_model, mask_id=MASK_ID, block_size=B, max_new_tokens=2 * B, fused_commit=False
    )
    tight = decoder.generate(prompt, unmasking=UnmaskingConfig("entropy_bounded", 0.0))
    wide = decoder.generate(prompt, unmasking=UnmaskingConfig("entropy_bounded", 1e6))
    # budget 0: one token per step; an unbounded budget: the whole block at once
    assert tight.stats.forward_passes == 1 + 2 * B - 1
    assert wide.stats.forward_passes == 1 + 2 * 2 - 1
    greedy_one = decoder.generate(prompt, unmasking=UnmaskingConfig("entropy", 0.0))
    assert tight.stats.forward_passes == greedy_one.stats.forward_passes


# ------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("ar", [False, True])
def test_seeded_top_k_sampling_is_reproducible_across_batch_sizes(tiny_model, ar):
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], list(range(1, 17)), [9, 8]]
    sampling = SamplingConfig(temperature=1.5, top_k=3)
    common = dict(mask_id=MASK_ID, max_new_tokens=12, sampling=sampling, seed=11)
    if ar:
        decoder = ARDecoder(tiny_model, **common)
    else:
        decoder = BlockDecoder(tiny_model, block_size=4, **common)
    batched = decoder.generate(prompts)
    for i, prompt in enumerate(prompts):
        assert decoder.generate([prompt], row_ids=[i]).tokens[0] == batched.tokens[i]
    pairs = decoder.generate(prompts[2:], row_ids=[2, 3])
    assert pairs.tokens == batched.tokens[2:]
    assert decoder.generate(prompts).tokens == batched.tokens  # same seed, same tokens
    other = decoder.generate(prompts, seed=12)
    assert other.tokens != batched.tokens


def test_top_k_sampling_draws_only_among_the_k_likeliest(tiny_model):
    from nbdiff_megatron.inference.unmasking import propose_tokens

    logits = torch.randn(64, 20, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    draws, _ = propose_tokens(logits, SamplingConfig(temperature=5.0, top_k=2), gen)
    top2 = logits.topk(2, dim=-1).indices
    assert bool((draws[:, None] == top2).any(dim=1).all())
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=-1)


# ------------------------------------------------------------------------- sub-block cache
def test_sub_block_cache_forward_reuses_the_head_exactly(tiny_model):
    """block_logits(block, reuse=r) runs only the columns from r on; when the cached k/v of the first
    r columns come from a forward of the same block, its logits equal the full forward's."""
    x0 = random_tokens((2, 3 * B), 40)
    decoder = BlockDecoder(tiny_model, mask_id=MASK_ID, block_size=B)
    session = decoder.start(x0[:, : 2 * B])
    session.prefill()
    block = x0[:, 2 * B :].clone()
    block[:, 5:] = MASK_ID
    full = session.block_logits(block)
    for reuse in (1, 4, 7):
        part = session.block_logits(block, reuse)
        assert session.cache.length == 2 * B  # nothing committed
        torch.testing.assert_close(part[:, reuse:], full[:, reuse:], rtol=0, atol=1e-5)


def test_sub_block_cache_generation_is_close_to_exact(tiny_model):
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22]]
    options = dict(mask_id=MASK_ID, block_size=B, sub_block_size=4, max_new_tokens=24)
    exact = BlockDecoder(tiny_model, **options).generate(prompts)
    approx = BlockDecoder(tiny_model, sub_block_cache=True, **options).generate(prompts)
    assert all(len(t) == 24 and MASK_ID not in t for t in approx.tokens)
    # each row's first generated token lies in the first sub-block, decoded before any reuse
    assert [t[0] for t in approx.tokens] == [t[0] for t in exact.tokens]
    # the saving is in columns per forward, not in forwards; the agreement is measured in
    # benchmarks/decode.py (BENCHMARKS.md), not asserted: the mode is approximate
    with pytest.raises(InferenceError, match="sub-block-cache"):
        DecodeConfig(block_size=B, sub_block_cache=True)
