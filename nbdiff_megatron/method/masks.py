"""Attention masks of NBDiff training and inference (NBDIFF.md §2-§3).

Convention used everywhere in this project: a boolean mask is indexed [query, key] and **True means the
query MAY attend to the key**. (megatron-core's boolean masks mean the opposite; the model's adapter is the
one place that inverts.)

Training runs on the concatenation x_t ⊕ x_0 of length 2L: rows/columns 0..L-1 are the noised view x_t,
L..2L-1 the clean sequence x_0. With ``blk(i) = pos(i) // B`` (``pos`` = position inside the document):

    query \\ key | x_t                    | x_0
    x_t         | blk(i) == blk(j)  M_BD | blk(j) <  blk(i)  M_OBC
    x_0         | never                  | j <= i (context-causal, M_CC) or blk(j) <= blk(i) (block-causal)

and, when documents are packed, additionally ``doc(i) == doc(j)`` everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MASK_KINDS = ("context_causal", "block_causal")


# ----------------------------------------------------------------------------------------------------------
# argument checks (ValueError naming the argument and the allowed values)


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_kind(kind: str) -> None:
    if kind not in MASK_KINDS:
        raise ValueError(f"kind must be one of {MASK_KINDS}, got {kind!r}")


def _check_doc_ids(doc_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    if not isinstance(doc_ids, torch.Tensor):
        raise ValueError(f"doc_ids must be a LongTensor of shape [L] or [b, L], got {type(doc_ids)}")
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
    """``blk(i) = pos(i) // B`` with blocks counted from each document's start (NBDIFF.md §3). [..., L]."""
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("block_size", block_size)
    if doc_ids is not None:
        doc_ids = _check_doc_ids(doc_ids, seq_len)
    return _positions(seq_len, doc_ids) // block_size


def training_position_ids(seq_len: int, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids of x_t ⊕ x_0: both halves carry 0..L-1 (restarting per document). [2L] or [b, 2L].

    RoPE must see block k of x_t and block k of x_0 at the same positions (NBDIFF.md §3).
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three non-empty tiles (x_t→x_t, x_t→x_0, x_0→x_0), each [..., L, L], True = may attend."""
    device = doc_ids.device if doc_ids is not None else None
    pos = _positions(seq_len, doc_ids, device)
    blk = pos // block_size
    bq, bk = blk.unsqueeze(-1), blk.unsqueeze(-2)
    if doc_ids is None:
        same_doc = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    else:
        same_doc = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)
    noised_to_noised = same_doc & (bq == bk)  # M_BD
    noised_to_clean = same_doc & (bk < bq)  # M_OBC
    if kind == "context_causal":
        idx = torch.arange(seq_len, device=device)
        clean_to_clean = same_doc & (idx.unsqueeze(0) <= idx.unsqueeze(1))  # M_CC
    else:
        clean_to_clean = same_doc & (bk <= bq)
    return noised_to_noised, noised_to_clean, clean_to_clean


def _assemble(tt: torch.Tensor, t0: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    top = torch.cat([tt, t0], dim=-1)
    bottom = torch.cat([torch.zeros_like(c0), c0], dim=-1)  # x_0 never attends to x_t
    return torch.cat([top, bottom], dim=-2)


def training_mask(
    seq_len: int,
    block_size: int,
    kind: str = "context_causal",
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The 2L x 2L training mask of x_t ⊕ x_0 (NBDIFF.md §3 table). True = may attend.

    Args:
        seq_len: L, the length of x_0 (and of x_t).
        block_size: B >= 1. Neither L nor the document lengths need be multiples of B.
        kind: "context_causal" (NBDiff, default) or "block_causal" (BD3-LM / SDAR ablation).
        doc_ids: optional [L] or [b, L] non-decreasing document ids of packed documents; then no token
            attends across documents and blocks are counted from each document's start.

    Returns:
        BoolTensor [2L, 2L], or [b, 2L, 2L] when ``doc_ids`` is [b, L].
    """
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("block_size", block_size)
    _check_kind(kind)
    if doc_ids is not None:
        doc_ids = _check_doc_ids(doc_ids, seq_len)
    return _assemble(*_tiles(seq_len, block_size, kind, doc_ids))


def annealed_training_mask(
    seq_len: int,
    block_size: int,
    progress: float,
    *,
    generator: torch.Generator,
    kind: str = "context_causal",
    doc_ids: torch.Tensor | None = None,
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
    exactly the target-B mask (tested).

    Returns [2L, 2L] (or [b, 2L, 2L] with batched doc_ids; then each sample draws its own ``r``).
    """
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("block_size", block_size)
    _check_kind(kind)
    if not 0.0 <= float(progress) <= 1.0:
        raise ValueError(f"progress must lie in [0, 1], got {progress!r}")
    if doc_ids is not None:
        doc_ids = _check_doc_ids(doc_ids, seq_len)
    tt_ar, t0_ar, c0_ar = _tiles(seq_len, 1, kind, doc_ids)
    tt_bd, _, _ = _tiles(seq_len, block_size, kind, doc_ids)
    shape = tt_bd.shape
    draw = torch.rand(shape, generator=generator, device=generator.device) < float(progress)
    draw = draw.to(tt_bd.device)
    in_block_pair = tt_bd & ~tt_ar  # same document, same target block, j != i
    idx = torch.arange(seq_len, device=tt_bd.device)
    earlier = idx.unsqueeze(0) < idx.unsqueeze(1)  # key j < query i
    chosen = in_block_pair & draw
    tt = tt_ar | chosen
    t0 = t0_ar & ~(chosen & earlier)
    c0 = c0_ar | (chosen & ~earlier) if kind == "block_causal" else c0_ar
    return _assemble(tt, t0, c0)


# ----------------------------------------------------------------------------------------------------------
# FlexAttention mask_mod


def training_mask_mod(
    seq_len: int,
    block_size: int,
    kind: str = "context_causal",
    doc_ids: torch.Tensor | None = None,
) -> Callable:
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` over the 2L sequence equal to ``training_mask``.

    ``doc_ids`` may be [L] (one layout for the whole batch) or [b, L] (indexed by the batch index).
    """
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("block_size", block_size)
    _check_kind(kind)
    length = seq_len
    if doc_ids is not None:
        doc_ids = _check_doc_ids(doc_ids, seq_len)
        pos = document_positions(doc_ids)
        blk = pos // block_size
        batched = doc_ids.dim() == 2
    context_causal = kind == "context_causal"

    def mask_mod(b, h, q_idx, kv_idx):
        q_clean = q_idx >= length
        k_clean = kv_idx >= length
        qi = torch.where(q_clean, q_idx - length, q_idx)
        ki = torch.where(k_clean, kv_idx - length, kv_idx)
        if doc_ids is None:
            same_doc = qi >= 0
            bq, bk = qi // block_size, ki // block_size
        elif batched:
            same_doc = doc_ids[b, qi] == doc_ids[b, ki]
            bq, bk = blk[b, qi], blk[b, ki]
        else:
            same_doc = doc_ids[qi] == doc_ids[ki]
            bq, bk = blk[qi], blk[ki]
        clean_rule = (ki <= qi) if context_causal else (bk <= bq)
        noised_query = (~q_clean) & (((~k_clean) & (bq == bk)) | (k_clean & (bk < bq)))
        clean_query = q_clean & k_clean & clean_rule
        return same_doc & (noised_query | clean_query)

    return mask_mod


# ----------------------------------------------------------------------------------------------------------
# inference


def inference_mask(prefix_len: int, block_len: int) -> torch.Tensor:
    """Mask of the active block's queries over [committed prefix ; active block]. [n, P + n].

    The active block sees every committed token (its KV cache, encoded causally) and itself
    bidirectionally (NBDIFF.md §7) -- exactly what an x_t block sees in training (M_OBC + M_BD).
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
