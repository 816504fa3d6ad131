"""Context parallelism (CP) for the x_t ⊕ x_0 forward: which tokens a CP rank holds, its inputs, its loss.

Layout ("zigzag" per half, docs/METHOD.md §3: both halves are cut the same way). Each half
of length L is cut into 2*cp chunks of c = L / (2*cp) tokens; CP rank r holds chunks r and 2cp-1-r of
x_t AND the same chunks of x_0. Its local sequence is, in this order::

    [x_t chunk r ; x_t chunk 2cp-1-r ; x_0 chunk r ; x_0 chunk 2cp-1-r]      (2L / cp tokens)

i.e. global positions ascending. Why this layout:

- Block k of x_t and block k of x_0 land on the same rank (equal position ids, docs/METHOD.md §3), so RoPE
  positions and the document layout of a rank are the same in both halves.
- Work is balanced: a query's number of visible keys grows with its position in BOTH halves (x_0 rows
  are causal; x_t rows see the clean blocks before theirs plus their own block), so pairing an early
  chunk with the mirrored late chunk gives every rank the same amount of attention work (the reason
  megatron's CP uses this split for causal LMs), which matters for FlexAttention's block sparsity.

The attention all-gathers K/V over the CP group and puts them back in sequence order
(`ContextParallelLayout.gather_order`); the mask a rank uses is the rows of the full 2L x 2L mask at its
global positions (`global_positions`): the dense mask's rows are sliced, the FlexAttention mask_mod is
wrapped so that a local query index is looked up in the global positions (`local_rows_mask_mod`), and
the BlockMask is cached per (layout, CP rank).

Loss: `cp_local_loss` evaluates the NBDiff loss pieces on the local logit rows only, taking targets
from the FULL micro-batch (every CP rank has it before sharding), so a row whose target lives on another
rank (the next token of L_AR, token shift's next masked token) is exact. With the global denominators
passed in, the local `total`s of the CP ranks sum to the loss of the micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nbdiff_megatron.errors import ConfigError
from nbdiff_megatron.method.losses import LossTerms, nbdiff_loss
from nbdiff_megatron.model.attention import (
    BLOCK_MASK_CACHE,
    AttentionMask,
    BlockMaskCache,
    build_block_mask,
)

__all__ = [
    "ContextParallelLayout",
    "cp_local_loss",
    "gather_cp_sequence",
    "local_flex_mask",
    "local_rows_mask_mod",
    "shard_model_inputs",
]


# ------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class ContextParallelLayout:
    """Which tokens of x_t ⊕ x_0 (length 2L) CP rank `cp_rank` of `cp_size` holds (zigzag per half)."""

    seq_length: int
    """L, the length of each half."""
    cp_size: int
    """Number of context-parallel ranks."""
    cp_rank: int
    """This rank's index in the CP group."""

    def __post_init__(self) -> None:
        for name in ("seq_length", "cp_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"context parallel {name} must be a positive integer, got {value!r}"
                )
        if not isinstance(self.cp_rank, int) or not 0 <= self.cp_rank < self.cp_size:
            raise ConfigError(f"cp_rank={self.cp_rank!r} must lie in [0, cp_size={self.cp_size})")
        if self.seq_length % (2 * self.cp_size):
            raise ConfigError(
                f"model.seq_length={self.seq_length} must be divisible by 2 * the context parallel "
                f"size = {2 * self.cp_size} (each half is cut into 2*cp chunks): change the sequence "
                "length or the CP size"
            )

    @classmethod
    def current(cls, seq_length: int) -> ContextParallelLayout:
        """The layout of this process, from megatron-core's parallel_state."""
        return cls(
            seq_length,
            parallel_state.get_context_parallel_world_size(),
            parallel_state.get_context_parallel_rank(),
        )

    @property
    def chunk_length(self) -> int:
        """c = L / (2 cp): tokens per chunk."""
        return self.seq_length // (2 * self.cp_size)

    @property
    def local_length(self) -> int:
        """2L / cp: tokens this rank holds."""
        return 2 * self.seq_length // self.cp_size

    def half_positions(
        self, rank: int | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """LongTensor [L / cp]: positions inside a half (0..L-1) held by `rank` (default: this rank)."""
        rank = self.cp_rank if rank is None else rank
        c = self.chunk_length
        chunk = torch.arange(c, device=device)
        return torch.cat([rank * c + chunk, (2 * self.cp_size - 1 - rank) * c + chunk])

    def global_positions(
        self, rank: int | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """LongTensor [2L / cp]: positions in x_t ⊕ x_0 of the local tokens, in local order.

        Local row k of the logits (and of input_ids / position_ids) is global position
        `global_positions()[k]`: < L is x_t position i, >= L is x_0 position i - L.
        """
        half = self.half_positions(rank, device)
        return torch.cat([half, half + self.seq_length])

    def gather_order(self, device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor [2L]: index into the rank-major all-gather of local tokens giving sequence order."""
        gathered = torch.cat([self.global_positions(r, device) for r in range(self.cp_size)])
        return torch.argsort(gathered)

    def shard(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a full `[..., 2L, ...]` tensor along `dim`."""
        if tensor.shape[dim] != 2 * self.seq_length:
            raise ValueError(
                f"expected {2 * self.seq_length} (= 2L) tokens along dim {dim}, got "
                f"{tuple(tensor.shape)}"
            )
        return tensor.index_select(dim, self.global_positions(device=tensor.device))


# ------------------------------------------------------------------------------- masks and inputs
def local_rows_mask_mod(mask_mod: Callable, query_positions: torch.Tensor) -> Callable:
    """A mask_mod over (local query, global key) from one over the full sequence.

    `query_positions[q_idx]` is the global position of local query `q_idx` (a lookup tensor, so the
    mask_mod stays traceable by FlexAttention).
    """

    def local_mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return mask_mod(b, h, query_positions[q_idx], kv_idx)

    return local_mask_mod


def local_flex_mask(
    mask_mod: Callable,
    layout: ContextParallelLayout,
    *,
    batch: int | None,
    device: torch.device | str,
    cache_key: Any = None,
    cache: BlockMaskCache | None = BLOCK_MASK_CACHE,
) -> AttentionMask:
    """This CP rank's FlexAttention mask: its query rows of `mask_mod` over all 2L keys.

    The BlockMask is cached under `(cache_key, cp_size, cp_rank)` when a `cache_key` is given.
    """
    device = torch.device(device)
    positions = layout.global_positions(device=device)
    full = 2 * layout.seq_length

    def build() -> Any:
        return build_block_mask(
            local_rows_mask_mod(mask_mod, positions), batch, layout.local_length, full, device
        )

    key = None
    if cache_key is not None:
        key = ("cp", cache_key, layout.seq_length, layout.cp_size, layout.cp_rank, str(device))
    block_mask = cache.get(key, build) if cache is not None and key is not None else build()
    return AttentionMask.flex(
        block_mask,
        mask_mod=mask_mod,
        cache_key=cache_key,
        cp_gather_order=layout.gather_order(device),
    )


def _block_mask_batch(block_mask: Any) -> int | None:
    shape = getattr(block_mask, "shape", None)
    if shape is None or shape[0] == 1:
        return None
    return int(shape[0])


def shard_attention_mask(
    mask: AttentionMask,
    layout: ContextParallelLayout,
    *,
    cache: BlockMaskCache | None = BLOCK_MASK_CACHE,
) -> AttentionMask:
    """This CP rank's rows of a full-sequence `AttentionMask` (dense: sliced; flex: rebuilt, cached)."""
    if mask.context_parallel:
        raise ValueError("the attention mask is already a context-parallel shard")
    full = 2 * layout.seq_length
    if mask.allowed is not None:
        allowed = mask.allowed
        if allowed.shape[-2:] != (full, full):
            raise ValueError(
                f"the dense mask covers {tuple(allowed.shape[-2:])} positions, the CP layout 2L = {full}"
            )
        rows = layout.global_positions(device=allowed.device)
        return AttentionMask.dense(
            allowed.index_select(-2, rows), cp_gather_order=layout.gather_order(allowed.device)
        )
    if mask.mask_mod is None:
        raise ValueError(
            "a FlexAttention mask can only be sharded for CP when it carries its mask_mod (masks from "
            "nbdiff_model_inputs do)"
        )
    device = getattr(mask.block_mask, "kv_num_blocks", None)
    device = device.device if isinstance(device, torch.Tensor) else torch.device("cpu")
    return local_flex_mask(
        mask.mask_mod,
        layout,
        batch=_block_mask_batch(mask.block_mask),
        device=device,
        cache_key=mask.cache_key,
        cache=cache,
    )


def shard_model_inputs(
    inputs: Any, layout: ContextParallelLayout, *, cache: BlockMaskCache | None = BLOCK_MASK_CACHE
) -> Any:
    """This CP rank's shard of a full micro-batch's `ModelInputs` (builder.nbdiff_model_inputs).

    Returns `ModelInputs(input_ids [b, 2L/cp], position_ids [b, 2L/cp], attention_mask)`: the local
    tokens (`layout.global_positions()`), their position ids (the full sequence's, so RoPE is exact),
    and the mask rows of the local queries over all 2L keys with the key gather order.
    """
    input_ids, position_ids, mask = inputs
    if not isinstance(mask, AttentionMask):
        raise TypeError(f"expected an AttentionMask, got {type(mask).__name__}")
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0).expand(input_ids.shape[0], -1)
    return type(inputs)(
        layout.shard(input_ids),
        layout.shard(position_ids),
        shard_attention_mask(mask, layout, cache=cache),
    )


def gather_cp_sequence(
    local: torch.Tensor, layout: ContextParallelLayout, *, dim: int = 1, group: Any = None
) -> torch.Tensor:
    """The full `[..., 2L, ...]` tensor from every CP rank's local `[..., 2L/cp, ...]` (no autograd).

    For evaluation and tests (e.g. full logits); training computes the loss on local rows instead.
    """
    if group is None:
        group = parallel_state.get_context_parallel_group()
    world = dist.get_world_size(group)
    if world != layout.cp_size:
        raise ValueError(f"the CP group has {world} ranks, the layout {layout.cp_size}")
    moved = local.movedim(dim, 0).contiguous()
    pieces = [torch.empty_like(moved) for _ in range(world)]
    dist.all_gather(pieces, moved, group=group)
    gathered = torch.cat(pieces).index_select(0, layout.gather_order(device=local.device))
    return gathered.movedim(0, dim)


# ------------------------------------------------------------------------------- loss


def cp_local_loss(
    local_logits: torch.Tensor,
    x0: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    layout: ContextParallelLayout,
    **options: Any,
) -> LossTerms:
    """`nbdiff_loss` (method/losses.py, eq. 2) restricted to this CP rank's logit rows; exact.

    Args:
        local_logits: [b, 2L/cp, V], this rank's logits (row k is `layout.global_positions()[k]`).
        x0, masked, t, loss_mask, doc_ids: the FULL micro-batch ([b, L]; t may be [b]), identical on
            every CP rank -- targets of local rows may sit in another rank's chunk.
        options: the keyword arguments of `nbdiff_loss` (ar_weight, token_shift, loss_mask, doc_ids,
            mdm_denominator, ar_denominator, chunk_rows, validate, ...); not `rows`: the layout's.
        mdm_denominator, ar_denominator: the global counts (`loss_token_counts` of the full
            micro-batches, summed over micro-batches and DATA-parallel ranks -- not over CP ranks,
            which hold the same micro-batch). Then `total` of each CP rank is its share and the CP
            ranks' totals sum to the global loss.

    Rows and targets are those of `nbdiff_loss`: x_t row i predicts masked x0[i] (x0[i+1] with token
    shift), x_0 row i predicts x0[i+1] where counted. The counts are split so that they too sum over
    CP ranks to the full ones: `mdm_count` counts the loss tokens at this rank's half positions,
    `ar_count` the AR targets of this rank's x_0 rows.
    """
    if x0.dim() != 2 or x0.shape[1] != layout.seq_length:
        raise ValueError(
            f"x0 must be the full micro-batch [b, L] with L = {layout.seq_length} (the CP layout's), "
            f"got {list(x0.shape)}"
        )
    if local_logits.dim() != 3 or tuple(local_logits.shape[:2]) != (
        x0.shape[0],
        layout.local_length,
    ):
        raise ValueError(
            f"local_logits must have shape [b, 2L/cp, V] = [{x0.shape[0]}, {layout.local_length}, V], "
            f"got {list(local_logits.shape)}"
        )
    rows = layout.global_positions(device=x0.device)
    return nbdiff_loss(local_logits, x0, masked, t, rows=rows, **options)
