"""Triton kernels for the fused loss's two passes over a chunk of fp32 logits (``ce_chunk``).

Imported only through ``ce_chunk``'s guarded import: importing this module needs ``triton``.

- ``chunk_stats``: one read of every logit. The grid is (row, column split); each program walks its
  split in blocks of columns with an online max / rescaled sum-exp and picks the target's logit in
  the same loop. The per-split partials (a few per row) are combined in torch. Splitting the columns
  keeps the GPU busy when a chunk has few rows; with one split it is one program per row.
- ``chunk_grad_``: one read and one write per logit, in place, over a (row, column block) grid.

The last column block of a row is masked, so any vocabulary size works (V_local need not be a power
of two). ``logits`` must be fp32 with unit column stride; the row stride is free.

``TRITON_INTERPRET=1`` (set before triton is imported) makes ``triton.jit`` build interpreted
kernels that run on CPU tensors: ``INTERPRETED`` records which kind this process built.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "chunk_grad_", "chunk_stats"]

# Columns per block: the stats program loops over blocks, the grad grid has one program per block.
_STATS_BLOCK = 4096
_GRAD_BLOCK = 2048
# CUDA caps the grid's second dimension; wider shards get wider grad blocks.
_MAX_GRID_Y = 65535
# Stats programs wanted per streaming multiprocessor before a row is split over several programs.
_PROGRAMS_PER_SM = 4


@triton.jit
def _stats_kernel(
    logits_ptr,
    row_stride,
    target_ptr,
    max_ptr,
    sum_ptr,
    picked_ptr,
    n_cols,
    span,
    n_splits,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    base = logits_ptr + row.to(tl.int64) * row_stride
    # -1 where the target lives on another shard: no column matches it.
    target = tl.load(target_ptr + row)
    start = split * span
    stop = tl.minimum(start + span, n_cols)
    # The host makes every split non-empty, so the first block turns the running max finite and
    # exp(m - m_new) never sees -inf - (-inf).
    m = float("-inf")
    s = 0.0
    picked = 0.0
    for c in range(start, stop, BLOCK):
        cols = c + tl.arange(0, BLOCK)
        # span is a whole number of blocks, so only the row's end cuts a block: masking against
        # n_cols (not stop) keeps the mask's alignment visible to the compiler (vector loads).
        valid = cols < n_cols
        x = tl.load(base + cols, mask=valid, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        e = tl.where(valid, tl.exp(x - m_new), 0.0)
        s = s * tl.exp(m - m_new) + tl.sum(e, axis=0)
        picked += tl.sum(tl.where(valid & (cols == target), x, 0.0), axis=0)
        m = m_new
    out = row * n_splits + split
    tl.store(max_ptr + out, m)
    tl.store(sum_ptr + out, s)
    tl.store(picked_ptr + out, picked)


@triton.jit
def _grad_kernel(
    logits_ptr,
    row_stride,
    lse_ptr,
    target_ptr,
    grad_ptr,
    n_cols,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n_cols
    ptrs = logits_ptr + row.to(tl.int64) * row_stride + cols
    x = tl.load(ptrs, mask=valid, other=0.0)
    lse = tl.load(lse_ptr + row)
    grad = tl.load(grad_ptr + row)
    target = tl.load(target_ptr + row)
    p = tl.exp(x - lse)
    d = tl.where(cols == target, p - 1.0, p) * grad
    tl.store(ptrs, d, mask=valid)


# The interpreter replaces triton.jit's JITFunction by an interpreted stand-in at decoration time.
INTERPRETED = not isinstance(_stats_kernel, triton.runtime.JITFunction)


def _check(logits: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(
            "the Triton loss kernels take fp32 logits [n, V_local] with unit column stride, got "
            f"{logits.dtype} {list(logits.shape)} strides {list(logits.stride())}"
        )


def _row_targets(local_target: torch.Tensor, here: torch.Tensor) -> torch.Tensor:
    """Each row's target column, -1 where the target is on another shard."""
    return torch.where(here, local_target, torch.full_like(local_target, -1)).contiguous()


def _auto_splits(rows: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return triton.cdiv(_PROGRAMS_PER_SM * sms, max(rows, 1))


def chunk_stats(
    logits: torch.Tensor,
    local_target: torch.Tensor,
    here: torch.Tensor,
    *,
    splits: int | None = None,
    block: int = _STATS_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ce_chunk.chunk_stats`` in one pass; leaves ``logits`` unchanged.

    ``splits``: column splits per row (default: enough programs to fill the GPU); ``block``:
    columns per loop step (a power of two; tests make it small to cover several masked blocks).
    """
    _check(logits)
    rows, cols = logits.shape
    if rows == 0 or cols == 0:
        # No column here: the TP reduction's neutral elements (max -inf, sums 0).
        return (
            logits.new_full((rows,), float("-inf")),
            logits.new_zeros(rows),
            logits.new_zeros(rows),
        )
    blocks = triton.cdiv(cols, block)
    wanted = _auto_splits(rows, logits.device) if splits is None else splits
    span = triton.cdiv(blocks, max(1, min(wanted, blocks))) * block
    n_splits = triton.cdiv(cols, span)  # every split holds at least one column
    partial = logits.new_empty((3, rows, n_splits))
    _stats_kernel[(rows, n_splits)](
        logits,
        logits.stride(0),
        _row_targets(local_target, here),
        partial[0],
        partial[1],
        partial[2],
        cols,
        span,
        n_splits,
        BLOCK=block,
        num_warps=8,
    )
    part_max, part_sum, part_picked = partial.unbind(0)
    if n_splits == 1:
        return part_max[:, 0], part_sum[:, 0], part_picked[:, 0]
    row_max = part_max.amax(dim=1)
    sum_exp = (part_sum * (part_max - row_max[:, None]).exp()).sum(dim=1)
    # Exactly one split holds the target column (or none does): the sum adds zeros to it.
    return row_max, sum_exp, part_picked.sum(dim=1)


def chunk_grad_(
    logits: torch.Tensor,
    lse: torch.Tensor,
    local_target: torch.Tensor,
    here: torch.Tensor,
    grad_ce: torch.Tensor,
    *,
    block: int = _GRAD_BLOCK,
) -> torch.Tensor:
    """``ce_chunk.chunk_grad_`` in place (one read + one write per logit); returns ``logits``."""
    _check(logits)
    rows, cols = logits.shape
    if rows == 0 or cols == 0:
        return logits
    while triton.cdiv(cols, block) > _MAX_GRID_Y:
        block *= 2
    _grad_kernel[(rows, triton.cdiv(cols, block))](
        logits,
        logits.stride(0),
        lse.to(torch.float32).contiguous(),
        _row_targets(local_target, here),
        grad_ce.to(torch.float32).contiguous(),
        cols,
        BLOCK=block,
        num_warps=4,
    )
    return logits
