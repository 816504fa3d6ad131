"""NBDiff losses on the x_t ⊕ x_0 forward (docs/METHOD.md §4: eq. 5 L_MDM, eq. 1 L_AR, eq. 2 total).

Logits layout: ``logits[:, :L]`` come from the noised half x_t, ``logits[:, L:]`` from the clean
half x_0 (both halves carry position ids 0..L-1, docs/METHOD.md §3). Which logit predicts which token:

- L_AR: the x_0 logit at position ``i`` predicts ``x0[i + 1]`` (ordinary next-token prediction), for
  ``i = 0..L-2``. A target counts when ``loss_mask`` allows the *target* token and, when ``doc_ids``
  is given, when ``i`` and ``i + 1`` are in the same document (no prediction across a document
  boundary).
- L_MDM without token shift: the x_t logit at ``i`` predicts the masked token ``x0[i]``.
- L_MDM with token shift: the x_t logit at ``i - 1`` predicts the masked token ``x0[i]`` of the same
  block. A block's first token is never masked in x_t (``mask_tokens(token_shift=True)``): it is
  predicted by the x_0 logit at ``kB - 1``, which is exactly its L_AR term.

Exact reduction across micro-batches and data-parallel ranks. ``LossTerms`` also returns the
numerators (``mdm_sum`` = Σ CE/t, ``ar_sum`` = Σ CE, both with grad) and the local denominators
(``mdm_count`` = loss tokens, ``ar_count`` = AR targets, no grad). The exact global loss is::

    total = (1 - λ) Σ mdm_sum / Σ mdm_count + λ Σ ar_sum / Σ ar_count   # Σ: micro-batches, ranks

Since the counts depend only on the masks, a training loop can get the global counts before the
forward (``loss_token_counts`` on every micro-batch, then an all-reduce SUM) and pass them as
``mdm_denominator`` / ``ar_denominator``: each micro-batch's ``total`` is then its exact share, and
the gradients summed over micro-batches and ranks (undo the data-parallel mean) are those of the
global loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, TypedDict

import torch
import torch.nn.functional as F

from nbdiff_megatron.method.masks import document_positions
from nbdiff_megatron.method.noise import block_layout

if TYPE_CHECKING:  # typing.Unpack for **kwargs is Python >= 3.11; annotations are not evaluated
    from typing_extensions import Unpack

__all__ = [
    "LossRowOptions",
    "LossRows",
    "LossTerms",
    "check_rows_covered",
    "loss_rows",
    "loss_terms",
    "loss_token_counts",
    "nbdiff_loss",
]

# Rows of logits upcast to fp32 at a time (~256 MiB of temporaries for the chunk).
_CHUNK_ELEMENTS = 1 << 26


class LossTerms(NamedTuple):
    """The terms of eq. 2 with their numerators and denominators (reduction: module docstring)."""

    total: torch.Tensor
    """(1 - λ) mdm + λ ar, scalar with grad."""
    mdm: torch.Tensor
    """L_MDM (eq. 5): mdm_sum / (mdm_denominator or mdm_count)."""
    ar: torch.Tensor
    """L_AR (eq. 1): ar_sum / (ar_denominator or ar_count)."""
    mdm_sum: torch.Tensor
    """Σ over masked & loss_mask tokens of CE / t (with grad)."""
    mdm_count: torch.Tensor
    """Number of loss_mask tokens of this micro-batch (float, no grad)."""
    ar_sum: torch.Tensor
    """Σ of the counted next-token CEs on the x_0 half (with grad)."""
    ar_count: torch.Tensor
    """Number of counted AR targets of this micro-batch (float, no grad)."""


def _as_loss_mask(
    loss_mask: torch.Tensor | None, shape: torch.Size, device: torch.device
) -> torch.Tensor:
    if loss_mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if loss_mask.dtype != torch.bool:
        raise ValueError(f"loss_mask must be a BoolTensor, got dtype {loss_mask.dtype}")
    if loss_mask.shape != shape:
        raise ValueError(
            f"loss_mask must have the shape of x0 {list(shape)}, got {list(loss_mask.shape)}"
        )
    return loss_mask


def _as_doc_ids(doc_ids: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    if doc_ids is None:
        return None
    if doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
        raise ValueError(f"doc_ids must be an integer tensor, got dtype {doc_ids.dtype}")
    if doc_ids.dim() == 1:
        doc_ids = doc_ids.unsqueeze(0).expand(shape[0], -1)
    if doc_ids.shape != shape:
        raise ValueError(
            f"doc_ids must have shape [L] = [{shape[1]}] or [b, L] = {list(shape)}, "
            f"got {list(doc_ids.shape)}"
        )
    return doc_ids


def _ar_targets(loss_mask: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
    """BoolTensor [b, L-1]: column i is True when the x_0 logit at i learns to predict x0[i + 1]."""
    valid = loss_mask[:, 1:]
    if doc_ids is not None:
        valid = valid & (doc_ids[:, 1:] == doc_ids[:, :-1])
    return valid


def loss_token_counts(
    x0: torch.Tensor,
    *,
    loss_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Denominators of L_MDM and L_AR for a micro-batch: (loss_mask tokens, counted AR targets).

    Sum them over micro-batches and ranks and pass them to ``nbdiff_loss`` as ``mdm_denominator`` /
    ``ar_denominator`` for an exact global reduction (module docstring).
    """
    if x0.dim() != 2:
        raise ValueError(f"x0 must have shape [b, L], got {list(x0.shape)}")
    lm = _as_loss_mask(loss_mask, x0.shape, x0.device)
    docs = _as_doc_ids(doc_ids, x0.shape)
    return lm.sum().float(), _ar_targets(lm, docs).sum().float()


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 logits are upcast; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _rows_cross_entropy(
    logits: torch.Tensor,
    seq: torch.Tensor,
    pos: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int,
) -> torch.Tensor:
    """fp32 cross-entropy of the rows ``logits[seq[k], pos[k]]``, ``chunk_rows`` rows at a time.

    Only the selected rows are gathered and upcast (advanced indexing: no copy of the whole tensor,
    contiguous or not); what autograd keeps is one fp32 log-softmax per selected row (at most 2L - 1
    rows per sequence), never a second fp32 copy of the whole [b, 2L, V].
    """
    pieces = [
        F.cross_entropy(
            _upcast(logits[seq[s : s + chunk_rows], pos[s : s + chunk_rows]]),
            targets[s : s + chunk_rows],
            reduction="none",
        )
        for s in range(0, seq.numel(), chunk_rows)
    ]
    if not pieces:
        # Keep the (zero) result attached to the graph so that backward still runs.
        return F.cross_entropy(_upcast(logits[seq, pos]), targets, reduction="none")
    return torch.cat(pieces)


def _denominator(given: torch.Tensor | float | None, local: torch.Tensor) -> torch.Tensor | float:
    # An empty micro-batch (or global batch) has a zero numerator: dividing by 1 keeps 0, not NaN.
    if given is None:
        return local.clamp(min=1.0)
    if isinstance(given, torch.Tensor):
        return given.float().clamp(min=1.0)
    if given < 0:
        raise ValueError(f"a loss denominator must be >= 0 (a token count), got {given!r}")
    return max(float(given), 1.0)


def nbdiff_loss(
    logits: torch.Tensor,
    x0: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    *,
    ar_weight: float,
    mdm_denominator: torch.Tensor | float | None = None,
    ar_denominator: torch.Tensor | float | None = None,
    chunk_rows: int | None = None,
    **options: Unpack[LossRowOptions],
) -> LossTerms:
    """NBDiff loss, eq. 2: ``total = (1 - λ) L_MDM + λ L_AR`` (docs/METHOD.md §4); reference version.

    - ``L_MDM`` (eq. 5) = Σ over ``masked & loss_mask`` of ``CE / t`` divided by the number of
      ``loss_mask`` tokens (or by ``mdm_denominator``).
    - ``L_AR`` (eq. 1) = mean next-token CE on the x_0 half over the counted targets (or divided by
      ``ar_denominator``); see the module docstring for which targets count.

    Shapes: ``logits [b, 2L, V]``, ``x0 [b, L]`` ids, ``masked [b, L]`` bool, ``t [b, L]`` per-token
    t (``per_token_t``; a per-sequence ``[b]`` is broadcast), ``loss_mask [b, L]`` bool (default:
    all), ``doc_ids [b, L]`` or ``[L]``. With ``token_shift`` the x_t logit at ``i - 1`` predicts
    masked token ``i``. A micro-batch without masked or loss tokens gives 0 (finite, with a zero
    gradient). ``validate=False`` skips the value checks that need a device synchronisation.

    ``block_size`` and ``positions`` (LongTensor ``[b, L]`` or ``[L]``: each token's position
    inside its document, as ``mask_tokens`` takes them) only feed validation: with ``token_shift``,
    ``validate=True`` and ``block_size`` given, a masked loss token that starts a block (counted
    from each document's start, ``noise.block_layout``) raises ``ValueError``, since its x_t
    predecessor lies in the previous block and would score it silently. Without ``positions`` the
    positions are derived from ``doc_ids`` (restarting at each document, as training does) or,
    without ``doc_ids``, are ``0..L-1``.

    ``rows`` (LongTensor ``[R]``, context parallelism): ``logits`` then holds only ``R`` of the
    ``2L`` rows, row ``k`` being global position ``rows[k]`` (0..L-1 x_t, L..2L-1 x_0). Only the
    predictions made by those rows are scored, and the counts are split by the same rule (a loss
    token counts where its x_t position lies, an AR target where its x_0 row lies), so the terms of
    disjoint row sets covering 0..2L-1 add up to the full loss, numerators and counts alike.

    ``options`` (``LossRowOptions``) go to ``loss_rows`` unchanged; their defaults are
    ``token_shift=False``, ``validate=True`` and None for the others.
    """
    if logits.dim() != 3 or not logits.dtype.is_floating_point:
        raise ValueError(
            f"logits must be a floating tensor [b, 2L, V], got {list(logits.shape)} {logits.dtype}"
        )
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be None or an integer >= 1, got {chunk_rows!r}")
    vocab = logits.shape[-1]
    sel = loss_rows(x0, masked, t, vocab=vocab, **options)
    check_rows_covered("logits", logits, x0, sel, options.get("rows"))
    chunk = chunk_rows or max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    ce = _rows_cross_entropy(logits, sel.seq, sel.pos, sel.targets, chunk)
    return loss_terms(
        ce, sel, ar_weight=ar_weight, mdm_denominator=mdm_denominator, ar_denominator=ar_denominator
    )


class LossRows(NamedTuple):
    """The logit rows that carry loss and what they predict (``loss_rows``).

    Row ``k`` is ``logits[seq[k], pos[k]]`` and predicts ``targets[k]``; the first ``n_mdm`` rows
    are L_MDM terms (weight 1/``t_mdm``), the rest L_AR terms.
    """

    seq: torch.Tensor
    """LongTensor [N]: the sample of each row."""
    pos: torch.Tensor
    """LongTensor [N]: the row's index along the logits' sequence dimension."""
    targets: torch.Tensor
    """LongTensor [N]: the token each row predicts."""
    t_mdm: torch.Tensor
    """Tensor [n_mdm]: t of each L_MDM row's target token."""
    n_mdm: int
    """Number of L_MDM rows (they come first)."""
    mdm_count: torch.Tensor
    """Loss tokens counted by this call (float, no grad)."""
    ar_count: torch.Tensor
    """AR targets counted by this call (float, no grad)."""
    n_rows: int
    """Rows the logits must have along the sequence dimension (2L, or len(rows))."""


class LossRowOptions(TypedDict, total=False):
    """The keyword arguments that ``nbdiff_loss`` and ``kernels.nbdiff_linear_loss`` pass on to
    ``loss_rows`` unchanged (meaning and defaults: ``loss_rows`` and ``nbdiff_loss``'s docstring).

    One declaration for both losses, so that they take the same options by construction.
    """

    token_shift: bool
    loss_mask: torch.Tensor | None
    doc_ids: torch.Tensor | None
    validate: bool
    block_size: int | None
    positions: torch.Tensor | None
    rows: torch.Tensor | None


def loss_rows(
    x0: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    *,
    vocab: int,
    token_shift: bool = False,
    loss_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    validate: bool = True,
    block_size: int | None = None,
    positions: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> LossRows:
    """Validate the loss inputs and select the rows that carry loss (arguments: ``nbdiff_loss``).

    Shared by the reference ``nbdiff_loss`` and the fused ``kernels.nbdiff_linear_loss``, so both
    score exactly the same rows against the same targets.
    """
    if x0.dim() != 2 or x0.dtype.is_floating_point or x0.dtype == torch.bool:
        raise ValueError(f"x0 must be integer token ids [b, L], got {list(x0.shape)} {x0.dtype}")
    batch, seq_len = x0.shape
    n_rows = 2 * seq_len if rows is None else rows.numel()
    if masked.dtype != torch.bool or masked.shape != x0.shape:
        raise ValueError(
            f"masked must be a BoolTensor of shape {list(x0.shape)}, "
            f"got {list(masked.shape)} {masked.dtype}"
        )
    if t.dim() == 1 and t.shape[0] == batch:
        t = t.unsqueeze(1).expand(batch, seq_len)
    if not t.dtype.is_floating_point or t.shape != x0.shape:
        raise ValueError(
            f"t must be a floating tensor of shape [b, L] = {list(x0.shape)} (or [b]), "
            f"got {list(t.shape)} {t.dtype}"
        )
    lm = _as_loss_mask(loss_mask, x0.shape, x0.device)
    docs = _as_doc_ids(doc_ids, x0.shape)

    selected = masked & lm
    if validate:
        _check_values(
            x0,
            t,
            selected,
            docs,
            vocab=vocab,
            token_shift=token_shift,
            block_size=block_size,
            positions=positions,
        )

    ar_valid = _ar_targets(lm, docs)
    counted_tokens = lm
    if rows is not None:
        # Keep only what this subset of rows predicts (context parallelism: one rank's rows).
        local = torch.zeros(2 * seq_len, dtype=torch.bool, device=x0.device)
        local[rows.to(x0.device)] = True
        shifted = torch.zeros_like(local[:seq_len])
        shifted[1:] = local[: seq_len - 1]
        predicted_here = shifted if token_shift else local[:seq_len]
        selected = selected & predicted_here
        ar_valid = ar_valid & local[seq_len : 2 * seq_len - 1]
        counted_tokens = lm & local[:seq_len]
    mdm_b, mdm_i = selected.nonzero(as_tuple=True)
    ar_b, ar_i = ar_valid.nonzero(as_tuple=True)
    # Logit positions: x_t rows are 0..L-1, x_0 rows are L..2L-1.
    seq = torch.cat([mdm_b, ar_b])
    pos = torch.cat([mdm_i - 1 if token_shift else mdm_i, seq_len + ar_i])
    if rows is not None:
        row_of = torch.full((2 * seq_len,), -1, dtype=torch.long, device=x0.device)
        row_of[rows.to(x0.device)] = torch.arange(n_rows, device=x0.device)
        pos = row_of[pos]
    targets = torch.cat([x0[mdm_b, mdm_i], x0[ar_b, ar_i + 1]])
    mdm_t = t[mdm_b, mdm_i]
    return LossRows(
        seq,
        pos,
        targets,
        mdm_t,
        mdm_b.numel(),
        counted_tokens.sum().float(),
        ar_valid.sum().float(),
        n_rows,
    )


def _check_values(
    x0: torch.Tensor,
    t: torch.Tensor,
    selected: torch.Tensor,
    docs: torch.Tensor | None,
    *,
    vocab: int,
    token_shift: bool,
    block_size: int | None,
    positions: torch.Tensor | None,
) -> None:
    """The value checks of ``loss_rows`` (``validate=True``; they synchronise with the device):
    token ids in the vocabulary, t in (0, 1] where it weighs a loss, and with token shift no masked
    loss token without an x_t predecessor of its own block and document."""
    batch, seq_len = x0.shape
    if x0.numel() and (bool((x0 < 0).any()) or bool((x0 >= vocab).any())):
        raise ValueError(f"x0 holds token ids outside [0, V) = [0, {vocab})")
    t_sel = t[selected]
    if t_sel.numel() and not bool(((t_sel > 0) & (t_sel <= 1)).all()):
        raise ValueError(
            "t must lie in (0, 1] at every masked loss token (the L_MDM weight is 1/t)"
        )
    if token_shift:
        if bool(selected[:, 0].any()):
            raise ValueError(
                "token_shift: a sequence's first token is masked, but no x_t logit precedes "
                "it; mask with mask_tokens(token_shift=True), which never masks a block's "
                "first token"
            )
        if docs is not None and bool((selected[:, 1:] & (docs[:, 1:] != docs[:, :-1])).any()):
            raise ValueError(
                "token_shift: a document's first token is masked (its x_t predecessor belongs "
                "to another document); mask with mask_tokens(token_shift=True, positions=...)"
            )
        if block_size is not None:
            if positions is None and docs is not None:
                positions = document_positions(docs)
            starts = block_layout(
                batch, seq_len, block_size=block_size, positions=positions, device=x0.device
            ).is_start
            if bool((selected & starts).any()):
                raise ValueError(
                    f"token_shift: a block's first token is masked (block_size {block_size}); "
                    "with shift it is decoded autoregressively and its x_t predecessor lies "
                    "in the previous block; mask with mask_tokens(token_shift=True, "
                    "block_size=..., positions=...) using the same block size and positions"
                )


def check_rows_covered(
    name: str,
    scores: torch.Tensor,
    x0: torch.Tensor,
    sel: LossRows,
    rows: torch.Tensor | None,
    *,
    note: str = "",
) -> None:
    """ValueError unless ``scores [b, R, ...]`` has one row per row of ``sel`` (R = 2L or len(rows))."""
    if tuple(scores.shape[:2]) != (x0.shape[0], sel.n_rows):
        expected = "2L" if rows is None else "len(rows)"
        raise ValueError(
            f"{name} must cover [b, {expected}] = [{x0.shape[0]}, {sel.n_rows}] rows for x0 "
            f"{list(x0.shape)}{note}, got {list(scores.shape)}"
        )


def loss_terms(
    ce: torch.Tensor,
    sel: LossRows,
    *,
    ar_weight: float,
    mdm_denominator: torch.Tensor | float | None = None,
    ar_denominator: torch.Tensor | float | None = None,
) -> LossTerms:
    """Eq. 2 from the per-row cross-entropies ``ce [N]`` of ``sel``'s rows (fp32, with grad)."""
    if not (0.0 <= ar_weight <= 1.0):
        raise ValueError(f"ar_weight (λ) must lie in [0, 1], got {ar_weight!r}")
    ce_mdm, ce_ar = ce[: sel.n_mdm], ce[sel.n_mdm :]
    mdm_sum = (ce_mdm / sel.t_mdm.to(ce_mdm.dtype)).sum()
    ar_sum = ce_ar.sum()
    mdm = mdm_sum / _denominator(mdm_denominator, sel.mdm_count)
    ar = ar_sum / _denominator(ar_denominator, sel.ar_count)
    total = (1.0 - ar_weight) * mdm + ar_weight * ar
    return LossTerms(total, mdm, ar, mdm_sum, sel.mdm_count, ar_sum, sel.ar_count)
