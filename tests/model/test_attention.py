"""NBDiffAttention backends: SDPA (dense mask) vs a naive softmax, FlexAttention vs SDPA, conventions."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from nbdiff_megatron.method.masks import training_mask, training_mask_mod
from nbdiff_megatron.model.attention import (
    AttentionMask,
    BlockMaskCache,
    NBDiffAttention,
    allowed_from_megatron_mask,
    build_block_mask,
    megatron_mask_from_allowed,
)
from nbdiff_megatron.model.builder import build_model, nbdiff_forward, nbdiff_model_inputs

from .conftest import tiny_config

L = 16


def _module(heads: int = 4, groups: int = 2, head_dim: int = 8) -> NBDiffAttention:
    config = TransformerConfig(
        num_layers=1,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        attention_dropout=0.0,
        use_cpu_initialization=True,
    )
    return NBDiffAttention(config, layer_number=1).eval()


def _qkv(
    seed: int,
    s: int,
    b: int = 2,
    heads: int = 4,
    groups: int = 2,
    d: int = 8,
    dtype=torch.float32,
    device="cpu",
):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, heads, d, generator=gen).to(device, dtype)
    k = torch.randn(s, b, groups, d, generator=gen).to(device, dtype)
    v = torch.randn(s, b, groups, d, generator=gen).to(device, dtype)
    return q, k, v


def _naive(q, k, v, allowed):
    """Softmax attention written out; allowed [b, Q, K], GQA by contiguous head groups."""
    s, b, h, d = q.shape
    rep = h // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(d)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v)
    return out.reshape(s, b, h * d)


def _docs() -> torch.Tensor:
    return torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 7])


def test_mask_convention_round_trip():
    allowed = training_mask(L, 4)
    masked_out = megatron_mask_from_allowed(allowed)
    assert masked_out[0, 1] == ~allowed[0, 1]
    assert torch.equal(allowed_from_megatron_mask(masked_out), allowed)
    assert torch.equal(AttentionMask.dense(allowed).to_megatron()[0, 0], masked_out)


def test_sdpa_matches_naive_softmax_and_megatron_tensor_convention():
    attn = _module()
    q, k, v = _qkv(0, 2 * L)
    allowed = training_mask(L, 4, doc_ids=_docs())
    expected = _naive(q, k, v, allowed)
    ours = attn(q, k, v, AttentionMask.dense(allowed))
    assert (ours - expected).abs().max() <= 1e-5
    # A bare boolean tensor is read in megatron-core's convention (True = masked out).
    bare = attn(q, k, v, megatron_mask_from_allowed(allowed)[:, None])
    assert torch.equal(bare, ours)


def test_none_mask_is_causal_and_prefix_block_shapes():
    attn = _module()
    q, k, v = _qkv(1, L)
    causal = torch.ones(L, L, dtype=torch.bool).tril().expand(2, L, L)
    assert (attn(q, k, v, None) - _naive(q, k, v, causal)).abs().max() <= 1e-5
    # queries of one block over [prefix ; block] keys (different lengths)
    qb = q[-4:]
    allowed = torch.ones(2, 4, L, dtype=torch.bool)
    assert attn(qb, k, v, AttentionMask.dense(allowed)).shape == (4, 2, 32)


@pytest.mark.parametrize("kind", ["context_causal", "block_causal"])
def test_flex_forward_matches_sdpa_on_cpu(kind):
    attn = _module()
    q, k, v = _qkv(2, 2 * L)
    docs = _docs()
    dense = attn(q, k, v, AttentionMask.dense(training_mask(L, 4, kind, docs)))
    block_mask = build_block_mask(training_mask_mod(L, 4, kind, docs), 2, 2 * L, 2 * L, "cpu")
    flex = attn(q, k, v, AttentionMask.flex(block_mask))
    assert (flex - dense).abs().max() <= 1e-5


def test_model_flex_inputs_match_sdpa_inputs_on_cpu(one_rank):
    model = build_model(tiny_config(), seed=11).eval()
    gen = torch.Generator().manual_seed(5)
    x0, xt = (torch.randint(0, 100, (2, L), generator=gen) for _ in range(2))
    cache = BlockMaskCache()
    with torch.no_grad():
        dense = model(*nbdiff_model_inputs(xt, x0, block_size=4, doc_ids=_docs(), backend="sdpa"))
        flex_inputs = nbdiff_model_inputs(
            xt, x0, block_size=4, doc_ids=_docs(), backend="flex", cache=cache
        )
        flex = model(*flex_inputs)
        again = nbdiff_model_inputs(
            xt, x0, block_size=4, doc_ids=_docs(), backend="flex", cache=cache
        )
    assert (flex - dense).abs().max() <= 1e-5
    assert cache.misses == 1 and cache.hits == 1
    assert again.attention_mask.block_mask is flex_inputs.attention_mask.block_mask
    other = nbdiff_model_inputs(xt, x0, block_size=2, doc_ids=_docs(), backend="flex", cache=cache)
    assert (
        cache.misses == 2 and other.attention_mask.block_mask is not again.attention_mask.block_mask
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_forward_backward_matches_sdpa_bf16_cuda():
    attn = _module(heads=8, groups=2, head_dim=64).cuda()
    length = 256
    q, k, v = _qkv(3, 2 * length, b=2, heads=8, groups=2, d=64, dtype=torch.bfloat16, device="cuda")
    docs = torch.tensor([[0] * 100 + [1] * 156, [0] * 256]).cuda()
    grads = {}
    outs = {}
    for backend in ("sdpa", "flex"):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        if backend == "sdpa":
            mask = AttentionMask.dense(training_mask(length, 32, doc_ids=docs))
        else:
            mask = AttentionMask.flex(
                build_block_mask(
                    training_mask_mod(length, 32, doc_ids=docs), 2, 2 * length, 2 * length, "cuda"
                )
            )
        out = attn(qq, kk, vv, mask)
        out.float().pow(2).sum().backward()
        outs[backend] = out.float()
        grads[backend] = [t.grad.float() for t in (qq, kk, vv)]
    assert (outs["flex"] - outs["sdpa"]).abs().max() <= 2e-2
    for gf, gs in zip(grads["flex"], grads["sdpa"]):
        assert (gf - gs).abs().max() <= 5e-2 * max(1.0, gs.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_flex_matches_sdpa_cuda(one_rank):
    model = build_model(tiny_config(attention_backend="flex"), seed=11).eval()
    x0 = torch.randint(0, 100, (2, L), device="cuda")
    xt = torch.randint(0, 100, (2, L), device="cuda")
    with torch.no_grad():
        dense = nbdiff_forward(model, xt, x0, block_size=4, backend="sdpa")
        flex = nbdiff_forward(model, xt, x0, block_size=4, backend="flex")
    assert (flex - dense).abs().max() <= 1e-4
