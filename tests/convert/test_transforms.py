"""The named transforms on plain tensors: layouts match a reference, inverses are exact."""

from __future__ import annotations

import pytest
import torch

from nbdiff_megatron.checkpoint import transforms as T
from nbdiff_megatron.errors import ConversionError


@pytest.mark.parametrize("heads,groups,head_dim", [(4, 4, 8), (4, 2, 8), (8, 1, 4), (6, 3, 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_interleave_layout_and_inverse(heads, groups, head_dim, bias):
    hidden = 16
    shape = T.AttentionShape(heads, groups, head_dim)
    tail = () if bias else (hidden,)
    q = torch.randn(heads * head_dim, *tail)
    k = torch.randn(groups * head_dim, *tail)
    v = torch.randn(groups * head_dim, *tail)
    fused = T.qkv_interleave(q, k, v, shape)
    assert fused.shape == ((heads + 2 * groups) * head_dim, *tail)
    # Reference: per group, its query heads, then its key head, then its value head.
    per = heads // groups
    expected = []
    for g in range(groups):
        expected += [q[(g * per + j) * head_dim : (g * per + j + 1) * head_dim] for j in range(per)]
        expected.append(k[g * head_dim : (g + 1) * head_dim])
        expected.append(v[g * head_dim : (g + 1) * head_dim])
    assert torch.equal(fused, torch.cat(expected))
    q2, k2, v2 = T.qkv_split(fused, shape)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_gated_mlp_concat_and_split():
    gate, up = torch.randn(12, 5), torch.randn(12, 5)
    fc1 = T.gated_mlp_concat(gate, up)
    assert torch.equal(fc1[:12], gate) and torch.equal(fc1[12:], up)
    g2, u2 = T.gated_mlp_split(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)


def test_vocab_padding_and_mask_rows():
    table = torch.randn(7, 4)
    grown = T.add_mask_rows(table, 8)
    assert torch.equal(grown[:7], table)
    assert torch.allclose(grown[7], table.mean(0))
    assert T.add_mask_rows(table, 7) is table
    padded = T.pad_vocab(grown, 16)
    assert padded.shape == (16, 4) and torch.count_nonzero(padded[8:]) == 0
    assert torch.equal(T.unpad_vocab(padded, 8), grown)
    with pytest.raises(ConversionError):
        T.pad_vocab(table, 6)
    with pytest.raises(ConversionError):
        T.add_mask_rows(table, 5)
    with pytest.raises(ConversionError):
        T.unpad_vocab(table, 9)


def test_vocab_transform_bf16_exact():
    table = torch.randn(9, 4).to(torch.bfloat16)
    assert torch.equal(T.unpad_vocab(T.pad_vocab(table, 128), 9), table)
