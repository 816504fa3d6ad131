"""Noising of the x_t half: diffusion-time sampling and token masking (docs/METHOD.md §4, "Noising").

Conventions shared by every function here:

- Blocks. Without ``positions`` a row of length L is cut into ``ceil(L / B)`` blocks of ``B`` tokens
  (the last one may be short): token ``j`` is in block ``j // B`` at offset ``j % B``. With
  ``positions`` (packed documents, docs/METHOD.md §3 "Packed documents"), ``positions[r, j]`` is the
  position of token ``j`` inside its document (its position id, restarting at 0 for each document)
  and blocks are counted from each document's start: a token starts a new block when it is the row's
  first token, when ``positions % B == 0``, or when the positions do not continue by +1 (a new
  document that does not start at position 0, e.g. a truncated one). Its offset inside the block is
  ``positions % B``.
- Global block index. A per-block ``t`` of shape ``[b, n_blocks]`` is indexed by the *global* block
  index of a token: the number of block starts before it in its row (``cumsum(is_start) - 1``), i.e.
  the blocks of a packed row are numbered 0, 1, 2, ... left to right across documents. Without
  ``positions`` this is ``j // B``, so ``n_blocks`` must be exactly ``ceil(L / B)``; with
  ``positions`` ``n_blocks`` must be at least the largest number of blocks of a row
  (``block_layout(...).n_blocks``); extra columns are unused.
- Random numbers come only from an explicit, seeded ``torch.Generator`` (the training loop seeds one
  per sample from (seed, step, the sample's index in the global batch)); ``generator=None`` raises ``ValueError`` instead
  of silently falling back to the global RNG or a fixed seed (which would repeat the same noise each
  step). Draws are made on the generator's device and then moved, so a CPU generator gives the same
  noise for CPU and GPU tensors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "BlockLayout",
    "block_layout",
    "mask_probability",
    "mask_tokens",
    "mask_uniforms",
    "per_token_t",
    "sample_t",
]


def _require_generator(generator: torch.Generator | None, fn: str) -> torch.Generator:
    if generator is None:
        raise ValueError(
            f"{fn}: generator is required (a torch.Generator seeded from seed, step and the "
            "sample's index in the global batch); the global RNG is never used, so that resumed "
            "runs replay the same noise"
        )
    if not isinstance(generator, torch.Generator):
        raise ValueError(
            f"{fn}: generator must be a torch.Generator, got {type(generator).__name__}"
        )
    return generator


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")


def sample_t(
    batch: int,
    *,
    n_blocks: int | None = None,
    eps: float = 1e-3,
    lo: float | None = None,
    hi: float | None = None,
    antithetic: bool = False,
    generator: torch.Generator,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw diffusion times ``t ~ U(lo, hi)``, per sequence or per block (docs/METHOD.md §4, "Noising").

    The default range is ``[eps, 1]`` (``lo = eps``, ``hi = 1``); ``lo``/``hi`` clip it (``lo``
    replaces ``eps`` when given). ``0 < lo <= hi <= 1`` is required: ``t = 0`` would give the L_MDM
    weight ``1/t`` an infinite value.

    Returns a tensor of shape ``[batch]`` (per sequence) or ``[batch, n_blocks]`` (per block) with
    every value in ``[lo, hi]``, on ``device`` (default: the generator's device).

    ``antithetic=True`` mirrors pairs along the batch dimension: with ``h = batch // 2``, rows
    ``h..2h-1`` are ``lo + hi - (rows 0..h-1)``, so each pair has the mean ``(lo + hi) / 2``
    exactly; when ``batch`` is odd the last row is an independent draw. (This is the mirrored
    variant, not the stratified one.)
    """
    gen = _require_generator(generator, "sample_t")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    if n_blocks is not None and (
        isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1
    ):
        raise ValueError(
            f"n_blocks must be None (one t per sequence) or an integer >= 1, got {n_blocks!r}"
        )
    if not (0.0 < eps < 1.0):
        raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
    low = float(eps if lo is None else lo)
    high = float(1.0 if hi is None else hi)
    if not (0.0 < low <= 1.0):
        raise ValueError(f"lo must lie in (0, 1] (t = 0 has an infinite 1/t weight), got {low!r}")
    if not (low <= high <= 1.0):
        raise ValueError(f"hi must lie in [lo, 1] = [{low}, 1], got {high!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")

    shape = (batch,) if n_blocks is None else (batch, n_blocks)
    u = torch.rand(shape, generator=gen, device=gen.device, dtype=torch.float64)
    t = low + (high - low) * u
    if antithetic:
        half = batch // 2
        t[half : 2 * half] = (low + high) - t[:half]
    # Clamping only absorbs the float rounding of lo + (hi - lo) * u.
    t = t.to(dtype).clamp_(min=low, max=high)
    return t if device is None else t.to(device)


class BlockLayout(NamedTuple):
    """Where every token of a [b, L] batch sits in the block structure (module docstring)."""

    index: torch.Tensor
    """LongTensor [b, L]: global block index of the token in its row (indexes a per-block t)."""
    offset: torch.Tensor
    """LongTensor [b, L]: position of the token inside its block, 0..B-1."""
    is_start: torch.Tensor
    """BoolTensor [b, L]: the token is the first token of its block in this row."""
    n_blocks: int
    """Largest number of blocks of a row (ceil(L / B) without positions)."""


def block_layout(
    batch: int,
    seq_len: int,
    *,
    block_size: int,
    positions: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> BlockLayout:
    """Block index, offset and start of each token (docs/METHOD.md §2 ``blk(i) = i // B``; §3 packing).

    ``positions`` (LongTensor ``[b, L]`` or ``[L]``) are per-document position ids; blocks then
    restart at each document (``blk = pos // B``) and are numbered globally along the row.
    """
    _check_block_size(block_size)
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch and seq_len must be >= 1, got batch={batch}, seq_len={seq_len}")
    if positions is None:
        j = torch.arange(seq_len, device=device)
        offset = (j % block_size).expand(batch, seq_len)
        index = (j // block_size).expand(batch, seq_len)
        return BlockLayout(index, offset, offset == 0, math.ceil(seq_len / block_size))

    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise ValueError(f"positions must be an integer tensor, got dtype {positions.dtype}")
    if positions.dim() == 1:
        positions = positions.unsqueeze(0).expand(batch, -1)
    if tuple(positions.shape) != (batch, seq_len):
        raise ValueError(
            f"positions must have shape [L] = [{seq_len}] or [b, L] = [{batch}, {seq_len}], "
            f"got {list(positions.shape)}"
        )
    if bool((positions < 0).any()):
        raise ValueError("positions must be >= 0 (position of each token inside its document)")
    positions = positions.to(device) if device is not None else positions
    offset = positions % block_size
    continues = positions[:, 1:] == positions[:, :-1] + 1
    starts_later = (offset[:, 1:] == 0) | ~continues
    first = torch.ones((batch, 1), dtype=torch.bool, device=positions.device)
    is_start = torch.cat([first, starts_later], dim=1)
    index = torch.cumsum(is_start.long(), dim=1) - 1
    return BlockLayout(index, offset, is_start, int(index[:, -1].max().item()) + 1)


def _check_t_values(t: torch.Tensor, name: str = "t") -> None:
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(
            f"{name} must lie in [0, 1] (a masking probability), got values in "
            f"[{t.min().item()}, {t.max().item()}]"
        )


def per_token_t(
    t: torch.Tensor,
    *,
    seq_len: int,
    block_size: int,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expand a per-sequence ``t [b]`` or per-block ``t [b, n_blocks]`` to per-token ``[b, L]``.

    This is the ``t`` that ``nbdiff_loss`` weights L_MDM with (docs/METHOD.md §4, eq. 5, weight ``1/t``):
    each token carries the ``t`` of its sequence or of its block (global block index, module
    docstring).
    """
    _check_block_size(block_size)
    if t.dim() == 1:
        return t.unsqueeze(1).expand(t.shape[0], seq_len).contiguous()
    if t.dim() != 2:
        raise ValueError(f"t must have shape [b] or [b, n_blocks], got {list(t.shape)}")
    layout = block_layout(
        t.shape[0], seq_len, block_size=block_size, positions=positions, device=t.device
    )
    _check_n_blocks(t, layout, positions is not None, block_size)
    return torch.gather(t, 1, layout.index.contiguous())


def _check_n_blocks(t: torch.Tensor, layout: BlockLayout, packed: bool, block_size: int) -> None:
    got = t.shape[1]
    if packed and got < layout.n_blocks:
        raise ValueError(
            f"per-block t has {got} columns but the packed rows have up to {layout.n_blocks} "
            f"blocks of size {block_size}: n_blocks must be >= {layout.n_blocks} "
            "(block_layout(...).n_blocks)"
        )
    if not packed and got != layout.n_blocks:
        raise ValueError(
            f"per-block t has {got} columns; with block_size {block_size} it must have "
            f"n_blocks = ceil(L / B) = {layout.n_blocks}"
        )


def _rank_and_length(layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: its rank among its block's tokens in the row, and that block's token count.

    The rank counts from the block's first token *present in the row*, so it equals ``offset``
    except in a truncated document's first block (which starts at a non-zero offset); the count is
    the block's actual length (``B``, or fewer for a row's, a document's or a truncated document's
    edge block).
    """
    batch, seq_len = layout.index.shape
    device = layout.index.device
    j = torch.arange(seq_len, device=device).expand(batch, seq_len)
    start = torch.where(layout.is_start, j, torch.zeros_like(j))
    rank = j - torch.cummax(start, dim=1).values
    index = layout.index.contiguous()
    counts = torch.zeros((batch, layout.n_blocks), dtype=torch.long, device=device)
    counts.scatter_add_(1, index, torch.ones_like(index))
    return rank, torch.gather(counts, 1, index)


def mask_probability(
    t_token: torch.Tensor,
    layout: BlockLayout,
    *,
    block_size: int,
    position_dependent: bool = False,
    token_shift: bool = False,
    skew: float = 0.5,
) -> torch.Tensor:
    """Probability that each token is masked, ``[b, L]`` (docs/METHOD.md §4, "Noising", "Token shift").

    Uniform: ``p = t`` for every maskable token. With ``token_shift`` the first token of each block
    is not maskable (``p = 0``; it is decoded autoregressively).

    Position-dependent (Efficient-DLM), this project's formula, built per block from the block's
    *actual* length ``n`` (``B``, or fewer for the short last block of a row or of a document,
    docs/METHOD.md §3): the block has ``m = n - 1`` maskable slots with ``token_shift``, else
    ``m = n``; a token of rank ``r`` in its block (``r = offset``, counted from the first token the
    row holds) sits in slot ``q = r - (1 if token_shift else 0)``, ``q = 0..m-1``::

        w_q = (2 q - (m - 1)) / (m - 1)          # in [-1, 1], rises linearly, sums to 0
        p_q = t + skew * min(t, 1 - t) * w_q     # skew in [0, 1]

    ``p_q`` lies in ``[0, 1]`` for every ``t`` in ``[0, 1]`` (the amplitude never exceeds the
    distance of t to 0 or 1), the mean over the block's ``m`` slots is exactly ``t`` (the ``w_q``
    sum to 0) for full and short blocks alike, and for ``0 < t < 1`` and ``skew > 0`` it strictly
    increases with the position inside the block. At ``t = 0`` or ``1`` it is flat (it must be).
    A block with ``m <= 1`` maskable slots gets ``p = t``.
    """
    _check_block_size(block_size)
    if not (0.0 <= skew <= 1.0):
        raise ValueError(f"skew must lie in [0, 1] (0 = uniform masking), got {skew!r}")
    shift = 1 if token_shift else 0
    p = t_token
    if position_dependent and block_size - shift > 1:
        rank, length = _rank_and_length(layout)
        slots = (length - shift).to(t_token.dtype)
        slot = (rank - shift).to(t_token.dtype)
        # Blocks with a single maskable slot keep p = t (w = 0); the clamp avoids 0 / 0 there.
        weight = torch.where(slots > 1, (2.0 * slot - (slots - 1)) / (slots - 1).clamp(min=1), 0.0)
        amplitude = skew * torch.minimum(t_token, 1.0 - t_token)
        # The clamp only absorbs float rounding: |amplitude * weight| <= min(t, 1 - t).
        p = (t_token + amplitude * weight).clamp(0.0, 1.0)
    if token_shift:
        # is_start also covers a truncated document's first token, whose left neighbour is missing.
        p = torch.where(layout.is_start, torch.zeros_like(p), p)
    return p


def mask_uniforms(batch: int, seq_len: int, *, generator: torch.Generator) -> torch.Tensor:
    """The uniform draws ``u [batch, L]`` in [0, 1) that ``mask_tokens`` compares with the masking
    probabilities (a token is masked where ``u < p``), on the generator's device."""
    gen = _require_generator(generator, "mask_uniforms")
    return torch.rand((batch, seq_len), generator=gen, device=gen.device, dtype=torch.float32)


def mask_tokens(
    x0: torch.Tensor,
    t: torch.Tensor,
    *,
    block_size: int,
    mask_id: int,
    position_dependent: bool = False,
    token_shift: bool = False,
    generator: torch.Generator | None = None,
    positions: torch.Tensor | None = None,
    skew: float = 0.5,
    validate: bool = True,
    return_probability: bool = False,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build the noised view ``x_t`` of ``x0`` (docs/METHOD.md §4, "Noising"; §3 for ``positions``).

    Each token is masked independently with probability ``t`` of its sequence (``t [b]``) or block
    (``t [b, n_blocks]``, global block index, see the module docstring), shaped by
    ``position_dependent`` (``mask_probability``) and ``token_shift`` (a block's first token is
    never masked).

    Returns ``(x_t, masked)``: ``x_t = where(masked, mask_id, x0)`` and the BoolTensor ``masked``.
    ``x0`` must not contain ``mask_id`` (then ``masked == (x_t == mask_id)`` exactly).
    ``generator`` is required (module docstring) unless ``uniforms`` (``[b, L]``, the
    ``mask_uniforms`` of each row drawn beforehand, e.g. from one generator per sample) are given.
    ``validate=False`` skips the value checks that
    need a device synchronisation (t in [0, 1], mask_id absent from x0).

    ``return_probability=True`` returns ``(x_t, masked, p)`` with ``p [b, L]`` the probability each
    token was masked with (``mask_probability``): the L_MDM weight of a masked token is ``1 / p``,
    which is ``1 / t`` only for uniform masking (docs/METHOD.md §4, eq. 5).
    """
    if uniforms is None:
        _require_generator(generator, "mask_tokens")
    _check_block_size(block_size)
    if x0.dim() != 2:
        raise ValueError(f"x0 must have shape [b, L], got {list(x0.shape)}")
    if x0.dtype.is_floating_point or x0.dtype == torch.bool:
        raise ValueError(f"x0 must hold integer token ids, got dtype {x0.dtype}")
    if isinstance(mask_id, bool) or not isinstance(mask_id, int):
        raise ValueError(f"mask_id must be an integer token id, got {mask_id!r}")
    batch, seq_len = x0.shape
    if t.dim() not in (1, 2) or t.shape[0] != batch:
        raise ValueError(
            f"t must have shape [b] = [{batch}] or [b, n_blocks] = [{batch}, n], "
            f"got {list(t.shape)}"
        )
    if validate:
        _check_t_values(t)
        if bool((x0 == mask_id).any()):
            raise ValueError(
                f"x0 already contains mask_id {mask_id}: "
                "pick a mask_id outside the data's token ids"
            )
    t = t.to(x0.device)
    layout = block_layout(
        batch, seq_len, block_size=block_size, positions=positions, device=x0.device
    )
    if t.dim() == 2:
        _check_n_blocks(t, layout, positions is not None, block_size)
        t_token = torch.gather(t, 1, layout.index.contiguous())
    else:
        t_token = t.unsqueeze(1).expand(batch, seq_len)
    p = mask_probability(
        t_token,
        layout,
        block_size=block_size,
        position_dependent=position_dependent,
        token_shift=token_shift,
        skew=skew,
    )
    if uniforms is None:
        uniforms = mask_uniforms(batch, seq_len, generator=generator)
    elif tuple(uniforms.shape) != (batch, seq_len):
        raise ValueError(
            f"uniforms must have shape [b, L] = [{batch}, {seq_len}], got {list(uniforms.shape)}"
        )
    u = uniforms
    # u lies in [0, 1): p = 0 never masks, p = 1 always masks.
    masked = u.to(x0.device) < p
    x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    if return_probability:
        return x_t, masked, p
    return x_t, masked
