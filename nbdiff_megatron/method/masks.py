"""Attention masks of NBDiff training and inference (docs/METHOD.md §2-§3).

Convention used everywhere in this project: a boolean mask is indexed [query, key] and **True means the
query MAY attend to the key**. (megatron-core's boolean masks mean the opposite; the model's adapter is the
one place that inverts.)

Training runs on the concatenation x_t ⊕ x_0 of length 2L: rows/columns 0..L-1 are the noised view x_t,
L..2L-1 the clean sequence x_0. With ``blk(i) = pos(i) // B`` (``pos`` = position inside the document):

    query \\ key | x_t                    | x_0
    x_t         | blk(i) == blk(j)  M_BD | blk(j) <  blk(i)  M_OBC
    x_0         | never                  | j <= i (context-causal, M_CC) or blk(j) <= blk(i) (block-causal)

and, when documents are packed, additionally ``doc(i) == doc(j)`` everywhere.

Multi-turn SFT (docs/METHOD.md §3): each token also carries a *turn id*, non-decreasing inside its document
and incremented right after the end of each response (``turn_ids``, produced by the SFT packer). Every
tile additionally requires ``turn(j) <= turn(i)``: no token sees anything after the end of its own turn.
In the causal tiles this already holds; it bites in the bidirectional x_t -> x_t block (a response's
last block would otherwise see the next user turn) and in the block-causal x_0 half.

Kinds: ``context_causal`` (NBDiff), ``block_causal`` (BD3-LM / SDAR ablation) and ``annealed``
(DiffuLLaMA-style baseline over the context-causal mask, ``annealed_training_mask``): the x_t rows
interpolate at random between the B=1 and the target-B mask according to a draw ``annealed_draw``
made by the caller (seeded like the noise), with a progress that the curriculum schedules.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MASK_KINDS = ("context_causal", "block_causal", "annealed")
BASE_KINDS = ("context_causal", "block_causal")


# ----------------------------------------------------------------------------------------------------------
# argument checks (ValueError naming the argument and the allowed values)


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_kind(kind: str, kinds: tuple[str, ...] = MASK_KINDS) -> None:
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds}, got {kind!r}")


def _check_turn_ids(turn_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    if not isinstance(turn_ids, torch.Tensor) or turn_ids.dtype.is_floating_point:
        raise ValueError("turn_ids must be an integer tensor of shape [L] or [b, L]")
    if turn_ids.dim() not in (1, 2) or turn_ids.shape[-1] != seq_len:
        raise ValueError(
            f"turn_ids must have shape [L] or [b, L] with L = seq_len = {seq_len}, "
            f"got {tuple(turn_ids.shape)}"
        )
    return turn_ids.long()


def _check_draw(draw: torch.Tensor | None, seq_len: int, block_size: int) -> torch.Tensor:
    if draw is None:
        raise ValueError(
            "kind='annealed' needs annealed_draw (a BoolTensor [b, L, B] from annealed_draw(...))"
        )
    if draw.dtype != torch.bool or draw.dim() not in (2, 3):
        raise ValueError(
            f"annealed_draw must be a BoolTensor [L, B] or [b, L, B], got {draw.dtype} "
            f"{tuple(draw.shape)}"
        )
    if tuple(draw.shape[-2:]) != (seq_len, block_size):
        raise ValueError(
            f"annealed_draw must have shape [..., L, B] = [..., {seq_len}, {block_size}], "
            f"got {tuple(draw.shape)}"
        )
    return draw


def _check_doc_ids(doc_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    if not isinstance(doc_ids, torch.Tensor):
        raise ValueError(
            f"doc_ids must be a LongTensor of shape [L] or [b, L], got {type(doc_ids)}"
        )
    if doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
        raise ValueError(f"doc_ids must hold integers, got dtype {doc_ids.dtype}")
    if doc_ids.dim() not in (1, 2) or doc_ids.shape[-1] != seq_len:
        raise ValueError(
            f"doc_ids must have shape [L] or [b, L] with L = seq_len = {seq_len}, "
            f"got {tuple(doc_ids.shape)}"
        )
    if seq_len > 1 and bool((doc_ids[..., 1:] < doc_ids[..., :-1]).any()):
        raise ValueError(
            "doc_ids must be non-decreasing along the sequence (documents are contiguous runs of one id)"
        )
    return doc_ids.long()


def _check_training_layout(
    seq_len: int,
    block_size: int,
    kind: str,
    kinds: tuple[str, ...],
    doc_ids: torch.Tensor | None,
    turn_ids: torch.Tensor | None,
    annealed_draw: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The checks every training-mask form shares; returns (doc_ids, turn_ids) as LongTensors and
    the checked ``annealed_draw`` (kind "annealed", which needs it; None for the other kinds)."""
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("block_size", block_size)
    _check_kind(kind, kinds)
    if doc_ids is not None:
        doc_ids = _check_doc_ids(doc_ids, seq_len)
    if turn_ids is not None:
        turn_ids = _check_turn_ids(turn_ids, seq_len)
    draw = _check_draw(annealed_draw, seq_len, block_size) if kind == "annealed" else None
    return doc_ids, turn_ids, draw


# ----------------------------------------------------------------------------------------------------------
# positions and blocks


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document: restarts at 0 where ``doc_ids`` changes. [..., L]."""
    doc_ids = doc_ids.long()
    seq_len = doc_ids.shape[-1]
    index = torch.arange(seq_len, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - start_index


def _positions(seq_len: int, doc_ids: torch.Tensor | None, device=None) -> torch.Tensor:
    if doc_ids is None:
        return torch.arange(seq_len, device=device)
    return document_positions(doc_ids)


def block_ids(seq_len: int, block_size: int, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``blk(i) = pos(i) // B`` with blocks counted from each document's start (docs/METHOD.md §3). [..., L]."""
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("block_size", block_size)
    if doc_ids is not None:
        doc_ids = _check_doc_ids(doc_ids, seq_len)
    return _positions(seq_len, doc_ids) // block_size


def training_position_ids(seq_len: int, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids of x_t ⊕ x_0: both halves carry 0..L-1 (restarting per document). [2L] or [b, 2L].

    RoPE must see block k of x_t and block k of x_0 at the same positions (docs/METHOD.md §3).
    """
    _check_positive_int("seq_len", seq_len)
    if doc_ids is not None:
        doc_ids = _check_doc_ids(doc_ids, seq_len)
    pos = _positions(seq_len, doc_ids)
    return torch.cat([pos, pos], dim=-1)


# ----------------------------------------------------------------------------------------------------------
# the dense training mask


def _tiles(
    seq_len: int,
    block_size: int,
    kind: str,
    doc_ids: torch.Tensor | None,
    turn_ids: torch.Tensor | None = None,
    draw: torch.Tensor | None = None,
    base: str = "context_causal",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three non-empty tiles (x_t→x_t, x_t→x_0, x_0→x_0), each [..., L, L], True = may attend.

    ``kind == "annealed"`` chains the B=1 and target-B tiles of ``base`` with ``draw``
    (``annealed_training_mask``); ``turn_ids`` add ``turn(j) <= turn(i)`` to every tile.
    """
    if kind == "annealed":
        tt, t0, c0 = _annealed_tiles(seq_len, block_size, base, doc_ids, draw)
    else:
        device = doc_ids.device if doc_ids is not None else None
        pos = _positions(seq_len, doc_ids, device)
        blk = pos // block_size
        bq, bk = blk.unsqueeze(-1), blk.unsqueeze(-2)
        if doc_ids is None:
            same_doc = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
        else:
            same_doc = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)
        tt = same_doc & (bq == bk)  # M_BD
        t0 = same_doc & (bk < bq)  # M_OBC
        if kind == "context_causal":
            idx = torch.arange(seq_len, device=device)
            c0 = same_doc & (idx.unsqueeze(0) <= idx.unsqueeze(1))  # M_CC
        else:
            c0 = same_doc & (bk <= bq)
    if turn_ids is not None:
        # No token sees past the end of its own turn (multi-turn SFT, docs/METHOD.md §3).
        turn_ok = turn_ids.to(tt.device).unsqueeze(-2) <= turn_ids.to(tt.device).unsqueeze(-1)
        tt, t0, c0 = tt & turn_ok, t0 & turn_ok, c0 & turn_ok
    return tt, t0, c0


def _annealed_tiles(
    seq_len: int,
    block_size: int,
    base: str,
    doc_ids: torch.Tensor | None,
    draw: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiles of the annealed mask (``annealed_training_mask`` explains the chaining)."""
    tt_ar, t0_ar, c0_ar = _tiles(seq_len, 1, base, doc_ids)
    tt_bd, _, _ = _tiles(seq_len, block_size, base, doc_ids)
    device = tt_bd.device
    pos = _positions(seq_len, doc_ids, device)
    offset = (pos % block_size).to(device)
    draw = draw.to(device)
    # r[.., i, j] = draw[.., i, offset(j)]: one decision per (query, key inside its target block).
    lead = torch.broadcast_shapes(draw.shape[:-2], offset.shape[:-1])
    index = offset.unsqueeze(-2).expand(*lead, seq_len, seq_len)
    chosen_draw = torch.gather(draw.expand(*lead, seq_len, block_size), -1, index)
    in_block_pair = tt_bd & ~tt_ar  # same document, same target block, j != i
    idx = torch.arange(seq_len, device=device)
    earlier = idx.unsqueeze(0) < idx.unsqueeze(1)  # key j < query i
    chosen = in_block_pair & chosen_draw
    tt = tt_ar | chosen
    t0 = t0_ar & ~(chosen & earlier)
    c0 = c0_ar | (chosen & ~earlier) if base == "block_causal" else c0_ar.expand_as(tt)
    return tt, t0, c0


def _assemble(tt: torch.Tensor, t0: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    top = torch.cat([tt, t0], dim=-1)
    bottom = torch.cat([torch.zeros_like(c0), c0], dim=-1)  # x_0 never attends to x_t
    return torch.cat([top, bottom], dim=-2)


def training_mask(
    seq_len: int,
    block_size: int,
    kind: str = "context_causal",
    doc_ids: torch.Tensor | None = None,
    *,
    turn_ids: torch.Tensor | None = None,
    annealed_draw: torch.Tensor | None = None,
) -> torch.Tensor:
    """The 2L x 2L training mask of x_t ⊕ x_0 (docs/METHOD.md §3 table). True = may attend.

    Args:
        seq_len: L, the length of x_0 (and of x_t).
        block_size: B >= 1. Neither L nor the document lengths need be multiples of B.
        kind: "context_causal" (NBDiff, default), "block_causal" (BD3-LM / SDAR ablation) or
            "annealed" (DiffuLLaMA-style baseline over the context-causal mask; needs
            ``annealed_draw``).
        doc_ids: optional [L] or [b, L] non-decreasing document ids of packed documents; then no token
            attends across documents and blocks are counted from each document's start.
        turn_ids: optional [L] or [b, L] turn ids (multi-turn SFT, module docstring): no token attends
            to a later turn of its document.
        annealed_draw: kind "annealed" only: BoolTensor [b, L, B] (or [L, B]) from ``annealed_draw``.

    Returns:
        BoolTensor [2L, 2L], or [b, 2L, 2L] when ``doc_ids``, ``turn_ids`` or ``annealed_draw`` is
        batched.
    """
    doc_ids, turn_ids, draw = _check_training_layout(
        seq_len, block_size, kind, MASK_KINDS, doc_ids, turn_ids, annealed_draw
    )
    return _assemble(*_tiles(seq_len, block_size, kind, doc_ids, turn_ids, draw))


def annealed_draw(
    batch: int,
    seq_len: int,
    block_size: int,
    progress: float,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """The random decisions of the annealed mask: BoolTensor [batch, L, B], True with ``progress``.

    Entry ``[s, i, o]`` decides the pair (query i, key j) of sample s where j is the token at offset
    ``o`` of i's target block (``annealed_training_mask``). Drawn on the generator's device.
    """
    _check_positive_int("batch", batch)
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("block_size", block_size)
    if not 0.0 <= float(progress) <= 1.0:
        raise ValueError(f"progress must lie in [0, 1], got {progress!r}")
    shape = (batch, seq_len, block_size)
    return torch.rand(shape, generator=generator, device=generator.device) < float(progress)


def annealed_training_mask(
    seq_len: int,
    block_size: int,
    progress: float,
    *,
    generator: torch.Generator,
    kind: str = "context_causal",
    doc_ids: torch.Tensor | None = None,
    turn_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """DiffuLLaMA-style annealed baseline: a random interpolation between the B=1 and target-B masks.

    The two structured masks differ only for pairs (i, j) inside one target block, j != i:

    - j < i: B=1 lets x_t[i] see the clean x_0[j]; target B lets it see the noised x_t[j];
    - j > i: B=1 hides position j; target B lets x_t[i] see x_t[j] (and, block-causal, x_0[i] see x_0[j]).

    One Bernoulli(progress) draw ``r[i, j]`` per such pair decides all of them at once ("chained"):

    - x_t[i] -> x_t[j] iff r[i, j];
    - x_t[i] -> x_0[j] (j < i, same block) iff not r[i, j];
    - block_causal only: x_0[i] -> x_0[j] (j > i, same block) iff r[i, j].

    Because the x_t and x_0 entries of a pair j < i come from the same draw with opposite values, a query
    never sees position j twice (both its noised and its clean view) and always sees it once; x_t[i] always
    sees itself. Outside the target block nothing is random: earlier blocks are seen through x_0, later
    ones hidden, as in both endpoints. ``progress = 0`` gives exactly the B=1 mask, ``progress = 1``
    exactly the target-B mask (tested). ``r[i, j]`` is ``annealed_draw(...)[i, offset of j in its
    block]``; ``training_mask(kind="annealed", annealed_draw=...)`` is this mask over the
    context-causal kind with a given draw (what training uses).

    Returns [2L, 2L] (or [b, 2L, 2L] with batched doc_ids; then each sample draws its own ``r``).
    """
    doc_ids, turn_ids, _ = _check_training_layout(
        seq_len, block_size, kind, BASE_KINDS, doc_ids, turn_ids
    )
    if not 0.0 <= float(progress) <= 1.0:
        raise ValueError(f"progress must lie in [0, 1], got {progress!r}")
    batch = doc_ids.shape[0] if doc_ids is not None and doc_ids.dim() == 2 else 1
    draw = annealed_draw(batch, seq_len, block_size, progress, generator=generator)
    if doc_ids is None or doc_ids.dim() == 1:
        draw = draw[0]
    tiles = _tiles(seq_len, block_size, "annealed", doc_ids, turn_ids, draw, base=kind)
    return _assemble(*tiles)


# ----------------------------------------------------------------------------------------------------------
# FlexAttention mask_mod


def training_mask_mod(
    seq_len: int,
    block_size: int,
    kind: str = "context_causal",
    doc_ids: torch.Tensor | None = None,
    *,
    turn_ids: torch.Tensor | None = None,
    annealed_draw: torch.Tensor | None = None,
) -> Callable:
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` over the 2L sequence equal to ``training_mask``.

    ``doc_ids`` / ``turn_ids`` may be [L] (one layout for the whole batch) or [b, L] (indexed by the
    batch index); kind "annealed" looks its decisions up in ``annealed_draw`` [b, L, B] (indexed by the
    batch index, so its BlockMask is per sample).
    """
    doc_ids, turn_ids, draw = _check_training_layout(
        seq_len, block_size, kind, MASK_KINDS, doc_ids, turn_ids, annealed_draw
    )
    length = seq_len
    if doc_ids is not None:
        pos = document_positions(doc_ids)
        blk = pos // block_size
        offset = pos % block_size
        batched = doc_ids.dim() == 2
    if turn_ids is not None:
        turns_batched = turn_ids.dim() == 2
    annealed = kind == "annealed"
    if annealed and draw.dim() == 2:
        draw = draw.unsqueeze(0)
    block_causal = kind == "block_causal"

    def mask_mod(b, h, q_idx, kv_idx):
        q_clean = q_idx >= length
        k_clean = kv_idx >= length
        qi = torch.where(q_clean, q_idx - length, q_idx)
        ki = torch.where(k_clean, kv_idx - length, kv_idx)
        if doc_ids is None:
            same_doc = qi >= 0
            bq, bk, ok = qi // block_size, ki // block_size, ki % block_size
        elif batched:
            same_doc = doc_ids[b, qi] == doc_ids[b, ki]
            bq, bk, ok = blk[b, qi], blk[b, ki], offset[b, ki]
        else:
            same_doc = doc_ids[qi] == doc_ids[ki]
            bq, bk, ok = blk[qi], blk[ki], offset[ki]
        same_block = bq == bk
        clean_rule = (bk <= bq) if block_causal else (ki <= qi)
        if annealed:
            # Chained draw (annealed_training_mask): inside the target block, x_t[i] sees x_t[j] iff
            # r, else x_0[j] when j < i; itself always; earlier blocks through x_0.
            r = draw[b if draw.shape[0] > 1 else 0, qi, ok]
            noised_key = same_block & ((ki == qi) | r)
            clean_key = (ki < qi) & ~(same_block & r)
        else:
            noised_key = same_block
            clean_key = bk < bq
        noised_query = (~q_clean) & (((~k_clean) & noised_key) | (k_clean & clean_key))
        clean_query = q_clean & k_clean & clean_rule
        keep = same_doc & (noised_query | clean_query)
        if turn_ids is not None:
            if turns_batched:
                keep = keep & (turn_ids[b, ki] <= turn_ids[b, qi])
            else:
                keep = keep & (turn_ids[ki] <= turn_ids[qi])
        return keep

    return mask_mod


# ----------------------------------------------------------------------------------------------------------
# inference


def inference_mask(prefix_len: int, block_len: int) -> torch.Tensor:
    """Mask of the active block's queries over [committed prefix ; active block]. [n, P + n].

    The active block sees every committed token (its KV cache, encoded causally) and itself
    bidirectionally (docs/METHOD.md §7) -- exactly what an x_t block sees in training (M_OBC + M_BD).
    """
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0:
        raise ValueError(f"prefix_len must be an integer >= 0, got {prefix_len!r}")
    _check_positive_int("block_len", block_len)
    return torch.ones(block_len, prefix_len + block_len, dtype=torch.bool)


def prefix_block_mask(prefix_len: int, block_len: int) -> torch.Tensor:
    """Full mask of one recompute forward over [prefix ; active block], no KV cache. [P + n, P + n].

    The prefix rows are causal (as the KV cache was built), the block rows are ``inference_mask``.
    """
    block_rows = inference_mask(prefix_len, block_len)
    total = prefix_len + block_len
    causal = torch.ones(prefix_len, total, dtype=torch.bool).tril()
    return torch.cat([causal, block_rows], dim=0)
