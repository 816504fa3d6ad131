"""Fused output projection + NBDiff masked cross-entropy (docs/METHOD.md §4, eq. 2), vocab-parallel.

``nbdiff_linear_loss(hidden, weight, ...)`` equals ``nbdiff_loss(hidden @ weight.T, ...)`` (the logits
gathered over the TP group) in value and in gradients w.r.t. ``hidden`` and ``weight``, without ever
holding the ``[rows, V]`` logits:

1. ``method.losses.loss_rows`` picks the rows that carry loss -- masked x_t rows (weight 1/t) and the
   x_0 rows with a counted AR target (none when λ = 0) -- exactly as the reference does. Only their
   hidden states are projected, which also cuts the output projection's FLOPs.
2. ``_VocabParallelLinearCE`` computes each row's cross-entropy ``lse - logit[target]`` chunk by chunk
   over the rows (``chunk_rows x V_local`` fp32 temporaries, whatever the number of rows), keeping only
   the row's log-sum-exp. Under TP the weight is this rank's vocabulary shard and the row max, sum-exp
   and target logit are reduced over the TP group (the algorithm of megatron-core's
   ``vocab_parallel_cross_entropy``, without the full logits). Backward recomputes each chunk's logits:
   ``d logits = (softmax - onehot) * dce``, ``d hidden = d logits @ W`` (summed over the TP group, as
   the column-parallel output layer's input gradient is), ``d W += d logits^T @ hidden`` in place
   (into megatron DDP's ``main_grad`` with ``accumulate_into_main_grad``). The two vocabulary-wide
   passes over a chunk (``kernels/ce_chunk.py``) work in place on its logits: one chunk buffer.
3. ``method.losses.loss_terms`` reduces the per-row CEs to eq. 2 (same code as the reference).

Layouts: ``hidden`` is ``[b, S, h]`` (batch first, the logits' layout) or, with ``sequence_first``,
megatron's ``[S, b, h]``; S is 2L, or ``len(rows)`` under context parallelism (``rows`` as in
``nbdiff_loss``). With ``sequence_parallel`` the hidden states are this TP rank's sequence shard
(megatron's SP layout, ``S / tp`` rows along the sequence dimension): they are all-gathered first and
the backward keeps this rank's slice of the (TP-summed) gradient, which is exactly the reduce-scatter
of megatron's SP output layer.

Backend: each chunk is projected by one torch GEMM (cuBLAS / MKL); the two vocabulary-wide passes
over its logits go through ``ce_chunk``, which runs our own Triton kernels on CUDA when triton
imports (``kernels/_triton_ce.py``: one read per logit for the stats, one read + one write for the
gradient) and chunked torch otherwise, same semantics; ``NBDIFF_LOSS_BACKEND=auto|torch|triton``
overrides the choice. Either way the memory does not grow with V beyond one chunk. Liger-Kernel's
and Cut-Cross-Entropy's Triton kernels were considered and do not fit: neither is vocab-parallel or
selects rows, and Liger computes the input gradient in forward for one scalar upstream gradient
(here every row has its own, 1/t or the AR weight).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from nbdiff_megatron.kernels import ce_chunk
from nbdiff_megatron.method.losses import (
    LossRowOptions,
    LossTerms,
    check_rows_covered,
    loss_rows,
    loss_terms,
)

if TYPE_CHECKING:  # typing.Unpack for **kwargs is Python >= 3.11; annotations are not evaluated
    from typing_extensions import Unpack

__all__ = ["nbdiff_linear_loss"]

# fp32 logits of one chunk: rows x V_local elements (~128 MiB).
_CHUNK_ELEMENTS = 1 << 25


def _group_size(group: Any) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _group_rank(group: Any) -> int:
    return 0 if _group_size(group) == 1 else dist.get_rank(group)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, n_valid: int) -> torch.Tensor:
    """fp32 logits of one chunk of rows against `weight`'s columns; the columns from `n_valid` on
    (vocabulary padding, when the padded shard is projected) are -inf, so they never score: their
    softmax, and so their gradient, is exactly 0."""
    logits = hidden @ weight.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if n_valid < logits.shape[1]:
        logits[:, n_valid:] = float("-inf")
    return logits


def _accumulate_weight_grad(dst: torch.Tensor, d_logits: torch.Tensor, h: torch.Tensor) -> None:
    """``dst [V', h] += d_logits.T @ h`` with no ``[V', h]`` temporary when the dtypes agree."""
    if d_logits.dtype == h.dtype == dst.dtype:
        dst.addmm_(d_logits.t(), h)
        return
    # Low-precision GEMM into a wider accumulator: vocabulary slices bound the temporary.
    step = max(1, _CHUNK_ELEMENTS // max(h.shape[1], 1))
    for s in range(0, dst.shape[0], step):
        dst[s : s + step] += (d_logits[:, s : s + step].t() @ h).to(dst.dtype)


def _main_grad_written(weight: torch.Tensor) -> torch.Tensor | None:
    """The autograd gradient of a weight whose gradient already went into ``weight.main_grad``.

    megatron-core's contract for gradient-accumulation fusion (tensor_parallel/layers.py): under its
    DDP (which gives parameters ``grad_added_to_main_grad``) the layer flags the weight and hands
    autograd a placeholder, so the weight's gradient-accumulator hook still runs -- the hook that
    marks the weight ready for the overlapped bucket reduce -- and skips adding it again. A weight
    shared with the embedding on the same stage (``zero_out_wgrad``) gets zeros instead: autograd
    sums them with the embedding's gradient, which the hook then adds. Outside DDP: no gradient.
    """
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros_like(weight)
    return torch.empty_like(weight)


class _VocabParallelLinearCE(torch.autograd.Function):
    """Per-row CE of ``hidden [N, h] @ weight[:n_valid].T``, vocab-parallel over ``group``.

    ``width`` is the number of weight rows projected: ``n_valid`` (the real columns only) or the
    whole shard (aligned GEMM shapes; the padding columns are masked, `_chunk_logits`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        vocab_start: int,
        n_valid: int,
        chunk_rows: int,
        group: Any,
        into_main_grad: bool,
        width: int,
    ) -> torch.Tensor:
        rows = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        w = weight[:width]
        local_target = targets - vocab_start
        here = (local_target >= 0) & (local_target < n_valid)
        local_target = torch.where(here, local_target, torch.zeros_like(local_target))
        row_max = torch.full((rows,), float("-inf"), dtype=acc, device=hidden.device)
        sum_exp = torch.zeros(rows, dtype=acc, device=hidden.device)
        target_logit = torch.zeros(rows, dtype=acc, device=hidden.device)
        if n_valid > 0:
            for s in range(0, rows, chunk_rows):
                e = s + chunk_rows
                stats = ce_chunk.chunk_stats(
                    _chunk_logits(hidden[s:e], w, n_valid), local_target[s:e], here[s:e]
                )
                row_max[s:e], sum_exp[s:e], target_logit[s:e] = stats
        if _group_size(group) > 1:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            # A shard with no real column has row_max = -inf and sum_exp = 0: exp(-inf) keeps 0.
            sum_exp = sum_exp * (row_max - global_max).exp()
            stats = torch.stack([sum_exp, target_logit])
            dist.all_reduce(stats, group=group)
            sum_exp, target_logit = stats[0], stats[1]
            row_max = global_max
        lse = row_max + sum_exp.log()
        ctx.save_for_backward(hidden, weight, local_target, here, lse)
        ctx.n_valid, ctx.chunk_rows, ctx.group = n_valid, chunk_rows, group
        ctx.into_main_grad, ctx.width = into_main_grad, width
        return lse - target_logit

    @staticmethod
    def backward(ctx: Any, grad_ce: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        hidden, weight, local_target, here, lse = ctx.saved_tensors
        n_valid, chunk_rows, group = ctx.n_valid, ctx.chunk_rows, ctx.group
        grad_hidden = torch.zeros_like(hidden)
        if ctx.into_main_grad:
            # megatron's gradient-accumulation fusion: straight into DDP's grad buffer.
            grad_weight = weight.main_grad
        else:
            # At least fp32: a bf16 sum over the row chunks would round.
            grad_weight = torch.zeros_like(weight, dtype=lse.dtype)
        width = ctx.width
        w = weight[:width]
        if n_valid > 0:
            grad_ce = grad_ce.to(lse.dtype)
            for s in range(0, hidden.shape[0], chunk_rows):
                e = s + chunk_rows
                h = hidden[s:e]
                d_logits = ce_chunk.chunk_grad_(
                    _chunk_logits(h, w, n_valid),
                    lse[s:e],
                    local_target[s:e],
                    here[s:e],
                    grad_ce[s:e],
                ).to(hidden.dtype)
                torch.mm(d_logits, w, out=grad_hidden[s:e])
                _accumulate_weight_grad(grad_weight[:width], d_logits, h)
        if _group_size(group) > 1:
            # hidden is replicated over the TP group; its gradient is the sum of the shards'.
            dist.all_reduce(grad_hidden, group=group)
        if ctx.into_main_grad:
            return grad_hidden, _main_grad_written(weight), None, None, None, None, None, None, None
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None, None, None


class _GatherSequence(torch.autograd.Function):
    """All-gather SP shards along dim ``dim``; backward keeps this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, dim: int, group: Any) -> torch.Tensor:  # type: ignore[override]
        world = _group_size(group)
        ctx.dim, ctx.rank, ctx.size = dim, _group_rank(group), local.shape[dim]
        if world == 1:
            return local
        moved = local.movedim(dim, 0).contiguous()
        pieces = [torch.empty_like(moved) for _ in range(world)]
        dist.all_gather(pieces, moved, group=group)
        return torch.cat(pieces).movedim(0, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        # The loss's backward already summed the hidden gradient over the TP group, so this rank's
        # slice is the reduce-scatter megatron's SP output layer would do.
        piece = grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size)
        return piece.contiguous(), None, None


def _check_operands(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    chunk_rows: int | None,
    accumulate_into_main_grad: bool,
) -> None:
    """The shapes ``nbdiff_linear_loss`` projects with, and its options (ValueError otherwise)."""
    if hidden.dim() != 3 or not hidden.dtype.is_floating_point:
        raise ValueError(
            f"hidden must be a floating tensor [b, S, h] (or [S, b, h] with sequence_first), got "
            f"{list(hidden.shape)} {hidden.dtype}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V_local, h] with h = {hidden.shape[-1]} (the hidden size), got "
            f"{list(weight.shape)}"
        )
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be None or an integer >= 1, got {chunk_rows!r}")
    if accumulate_into_main_grad and weight.requires_grad:
        main_grad = getattr(weight, "main_grad", None)
        if main_grad is None or tuple(main_grad.shape) != tuple(weight.shape):
            raise ValueError(
                "accumulate_into_main_grad=True needs weight.main_grad, a gradient buffer of the "
                f"weight's shape {list(weight.shape)} (megatron DDP sets it), got "
                f"{None if main_grad is None else list(main_grad.shape)}"
            )


def nbdiff_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    x0: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    *,
    ar_weight: float,
    mdm_denominator: torch.Tensor | float | None = None,
    ar_denominator: torch.Tensor | float | None = None,
    tp_group: Any = None,
    vocab_size: int | None = None,
    sequence_first: bool = False,
    sequence_parallel: bool = False,
    chunk_rows: int | None = None,
    accumulate_into_main_grad: bool = False,
    project_padded: bool = False,
    **options: Unpack[LossRowOptions],
) -> LossTerms:
    """``nbdiff_loss(hidden @ weight.T gathered over tp_group, ...)`` without the logits (module doc).

    Args:
        hidden: ``[b, S, h]`` final-norm hidden states (``[S, b, h]`` with ``sequence_first``); S is
            2L, or ``len(rows)`` under context parallelism; ``S / tp`` with ``sequence_parallel``.
        weight: ``[V_local, h]``, this TP rank's shard of the (padded) output weight; rank r holds
            vocabulary ids ``[r * V_local, (r + 1) * V_local)``.
        x0, masked, t, ar_weight, token_shift, loss_mask, doc_ids, mdm_denominator, ar_denominator,
        rows, validate, block_size, positions (``options``: ``method.losses.LossRowOptions``):
            as in ``method.losses.nbdiff_loss`` (t per token ``[b, L]`` or per sequence ``[b]``).
        tp_group: the tensor-parallel group the vocabulary is split over (None: one rank).
        vocab_size: the real vocabulary V (columns at or beyond it are padding and never score);
            None means ``V_local * tp``.
        chunk_rows: rows projected at a time (default: ~128 MiB of fp32 logits per chunk).
        accumulate_into_main_grad: add d weight straight into ``weight.main_grad`` (megatron DDP's
            gradient buffer, as megatron's gradient-accumulation fusion does) and give autograd a
            placeholder weight gradient (megatron's gradient-accumulation-fusion contract,
            `_main_grad_written`), so that megatron DDP's per-parameter hook -- which marks the
            weight's bucket ready under ``overlap_grad_reduce`` -- runs and does not add it twice.
        project_padded: project against the whole shard (``V_local`` columns, a multiple of
            ``make_vocab_size_divisible_by``) with the padding columns masked to -inf, instead of
            its real columns only (``weight[:n_valid]``, e.g. 38,177 of 38,400 on the last of 4 TP
            ranks for V = 153,377). Same values and gradients (padding rows get zero gradient);
            the aligned width may suit cuBLAS and the Triton loads better -- not measured yet
            (`benchmarks/gpu_suite.py` times both), so the default stays the real width.
    """
    _check_operands(hidden, weight, chunk_rows, accumulate_into_main_grad)
    tp = _group_size(tp_group)
    v_local = weight.shape[0]
    padded = v_local * tp
    vocab = padded if vocab_size is None else int(vocab_size)
    if not 0 < vocab <= padded:
        raise ValueError(
            f"the output weight shard has {v_local} rows x TP size {tp} = {padded} vocabulary "
            f"columns, which does not fit the vocabulary of {vocab}: pass the shard of a weight "
            f"padded for this TP size (model.padded_vocab_size(tp)) and tp_group of that size"
        )
    seq_dim = 0 if sequence_first else 1
    if sequence_parallel and tp > 1:
        hidden = _GatherSequence.apply(hidden, seq_dim, tp_group)
    if sequence_first:
        hidden = hidden.transpose(0, 1)
    sel = loss_rows(x0, masked, t, vocab=vocab, **options)
    check_rows_covered(
        "hidden", hidden, x0, sel, options.get("rows"), note=" (after the sequence-parallel gather)"
    )
    vocab_start = _group_rank(tp_group) * v_local
    n_valid = max(0, min(v_local, vocab - vocab_start))
    chunk = chunk_rows or max(1, _CHUNK_ELEMENTS // max(v_local, 1))
    # Only the loss-carrying rows are projected (advanced indexing: backward scatters into hidden).
    selected = hidden[sel.seq, sel.pos]
    ce = _VocabParallelLinearCE.apply(
        selected,
        weight,
        sel.targets,
        vocab_start,
        n_valid,
        chunk,
        tp_group,
        accumulate_into_main_grad and weight.requires_grad,
        v_local if project_padded else n_valid,
    )
    return loss_terms(
        ce, sel, ar_weight=ar_weight, mdm_denominator=mdm_denominator, ar_denominator=ar_denominator
    )
