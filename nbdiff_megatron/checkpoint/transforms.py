"""Named tensor transforms between HF (Llama / Qwen2 / Qwen3) and megatron-core layouts.

Each transform has a forward (HF -> megatron-core) and an inverse; both are pure functions over whole
(unsharded) tensors. The family tables in `families.py` name them. Keeping them exact inverses of each
other is what makes HF -> megatron -> HF bit-identical (tested on plain tensors and on models).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nbdiff_megatron.errors import ConversionError


@dataclass(frozen=True)
class AttentionShape:
    """What the QKV transforms need to know about the attention layout."""

    num_heads: int
    """Number of query heads."""
    num_query_groups: int
    """Number of key/value heads (GQA groups)."""
    head_dim: int
    """Per-head dimension."""

    @property
    def heads_per_group(self) -> int:
        """Query heads sharing one key/value head."""
        return self.num_heads // self.num_query_groups


def qkv_interleave(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape
) -> torch.Tensor:
    """Fuse HF q/k/v projections (weights [out, in] or biases [out]) into megatron's linear_qkv.

    megatron-core stores, per query group, that group's query heads, then its key head, then its value
    head; TP then shards whole groups, so this order must hold in the global tensor.
    """
    groups, per_group, head_dim = shape.num_query_groups, shape.heads_per_group, shape.head_dim
    tail = q.shape[1:]
    q = q.reshape(groups, per_group * head_dim, *tail)
    k = k.reshape(groups, head_dim, *tail)
    v = v.reshape(groups, head_dim, *tail)
    return torch.cat([q, k, v], dim=1).reshape(groups * (per_group + 2) * head_dim, *tail)


def qkv_split(
    qkv: torch.Tensor, shape: AttentionShape
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `qkv_interleave`: megatron linear_qkv -> (q, k, v) in HF order."""
    groups, per_group, head_dim = shape.num_query_groups, shape.heads_per_group, shape.head_dim
    tail = qkv.shape[1:]
    fused = qkv.reshape(groups, (per_group + 2) * head_dim, *tail)
    q, k, v = torch.split(fused, [per_group * head_dim, head_dim, head_dim], dim=1)
    return (
        q.reshape(groups * per_group * head_dim, *tail).contiguous(),
        k.reshape(groups * head_dim, *tail).contiguous(),
        v.reshape(groups * head_dim, *tail).contiguous(),
    )


def gated_mlp_concat(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF gate_proj and up_proj -> megatron's linear_fc1 ([gate; up] along the output dim)."""
    return torch.cat([gate, up], dim=0)


def gated_mlp_split(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `gated_mlp_concat`: linear_fc1 -> (gate_proj, up_proj)."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def add_mask_rows(table: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Grow an embedding / output table [V_hf, h] to the real vocabulary [vocab_size, h].

    Only used when the tokenizer's [MASK] id lies beyond the HF table (the tokenizer appended it). New
    rows are the mean of the existing rows: a neutral start for a token the AR model never saw, with
    the scale of a real embedding (a zero row would make the first masked logits degenerate).
    """
    rows = table.shape[0]
    if vocab_size < rows:
        raise ConversionError(
            f"the real vocabulary ({vocab_size}) is smaller than the HF embedding table ({rows} rows)"
        )
    if vocab_size == rows:
        return table
    mean = table.float().mean(dim=0, keepdim=True).to(table.dtype)
    return torch.cat([table, mean.expand(vocab_size - rows, -1)], dim=0)


def pad_vocab(table: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Pad a [V, h] table with zero rows to the TP-divisible size megatron-core allocates."""
    rows = table.shape[0]
    if padded_rows < rows:
        raise ConversionError(f"padded vocabulary {padded_rows} is smaller than the table ({rows})")
    if padded_rows == rows:
        return table
    return torch.cat([table, table.new_zeros(padded_rows - rows, *table.shape[1:])], dim=0)


def unpad_vocab(table: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Inverse of `pad_vocab`: keep the first `vocab_size` rows."""
    if table.shape[0] < vocab_size:
        raise ConversionError(
            f"the checkpoint's vocabulary table has {table.shape[0]} rows, fewer than the recorded "
            f"vocab_size {vocab_size}"
        )
    return table[:vocab_size].contiguous()
