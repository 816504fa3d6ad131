"""The two vocabulary-wide passes of the fused loss over one chunk of fp32 logits.

``nbdiff_linear_loss`` projects a chunk of loss rows (``logits = hidden @ W_local.T``, one GEMM) and
then needs, per row, two passes over the chunk's vocabulary columns:

- forward, ``chunk_stats``: the row max, ``sum exp(logit - max)`` and the target's logit (0 where the
  target lives on another TP rank's shard), which the TP group then reduces;
- backward, ``chunk_grad_``: ``d logits = (softmax - onehot(target)) * grad_ce`` written in place
  over the logits, so that no second ``rows x V`` buffer exists.

Both may overwrite ``logits``. Two backends with the same semantics, picked per call by ``backend()``:

- ``"torch"``: the functions below (CPU, and GPU without Triton);
- ``"triton"``: ``kernels/_triton_ce.py`` (one read per logit for the stats, one read + one write for
  the gradient), behind the one guarded import below: without triton the torch path runs, no error.

``NBDIFF_LOSS_BACKEND`` = ``auto`` (default: Triton for fp32 CUDA logits when triton imports, torch
otherwise), ``torch`` or ``triton`` (an error when Triton cannot run these logits). Under Triton's
interpreter (``TRITON_INTERPRET=1`` before triton is imported) ``triton`` also runs on CPU tensors,
which is how the CPU tests check the kernels; ``auto`` keeps torch on CPU.
"""

from __future__ import annotations

import os

import torch

try:  # the one guarded import of the optional GPU backend (docs/ARCHITECTURE.md, Conventions)
    from nbdiff_megatron.kernels import _triton_ce
except ImportError as _exc:  # triton is not installed: the torch path serves every device
    _triton_ce = None
    _TRITON_MISSING = f"{type(_exc).__name__}: {_exc}"
else:
    _TRITON_MISSING = ""

__all__ = ["BACKEND_ENV", "backend", "chunk_grad_", "chunk_stats"]

BACKEND_ENV = "NBDIFF_LOSS_BACKEND"
_CHOICES = ("auto", "torch", "triton")


def _requested() -> str:
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(
            f"{BACKEND_ENV}={os.environ[BACKEND_ENV]!r} is not a loss backend: use one of "
            f"{', '.join(_CHOICES)}"
        )
    return choice


def _triton_refusal(logits: torch.Tensor) -> str:
    """Why the Triton kernels cannot take ``logits`` ("" when they can)."""
    if _triton_ce is None:
        return f"triton is not importable ({_TRITON_MISSING}); install it (pip install triton)"
    if not (logits.is_cuda or (logits.device.type == "cpu" and _triton_ce.INTERPRETED)):
        return (
            f"the logits are on {logits.device.type}: Triton runs on CUDA tensors, or on CPU tensors "
            "under its interpreter (TRITON_INTERPRET=1 set before triton is imported)"
        )
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(-1) != 1:
        return (
            "the Triton kernels take fp32 [n, V_local] logits with unit column stride, got "
            f"{logits.dtype} {list(logits.shape)} strides {list(logits.stride())}"
        )
    return ""


def backend(logits: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: the implementation of the two passes for ``logits`` (module doc)."""
    choice = _requested()
    if choice == "torch":
        return "torch"
    refusal = _triton_refusal(logits)
    if choice == "triton" and refusal:
        raise RuntimeError(
            f"{BACKEND_ENV}=triton, but {refusal}; or set {BACKEND_ENV}=auto (or torch) to use "
            "the chunked-torch path"
        )
    if choice == "auto" and (refusal or not logits.is_cuda):
        return "torch"
    return "triton"


def chunk_stats(
    logits: torch.Tensor, local_target: torch.Tensor, here: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row_max, sum_exp, target_logit)`` of fp32 ``logits [n, V_local]``; overwrites ``logits``.

    ``local_target [n]`` is each row's target column in this shard (any valid column where
    ``here [n]`` is False: such rows get target logit 0, the TP sum adds the owner's).
    """
    if backend(logits) == "triton":
        return _triton_ce.chunk_stats(logits, local_target, here)
    picked = logits.gather(1, local_target[:, None]).squeeze(1)
    target_logit = torch.where(here, picked, torch.zeros_like(picked))
    row_max = logits.amax(dim=-1)
    sum_exp = logits.sub_(row_max[:, None]).exp_().sum(dim=-1)
    return row_max, sum_exp, target_logit


def chunk_grad_(
    logits: torch.Tensor,
    lse: torch.Tensor,
    local_target: torch.Tensor,
    here: torch.Tensor,
    grad_ce: torch.Tensor,
) -> torch.Tensor:
    """In place: ``logits <- (exp(logits - lse) - onehot(target)) * grad_ce``; returns ``logits``.

    ``lse [n]`` is the row's log-sum-exp over the whole (TP-gathered) vocabulary, ``grad_ce [n]`` the
    upstream gradient of each row's cross-entropy; the one-hot is 0 on rows whose target is not here.
    """
    if backend(logits) == "triton":
        return _triton_ce.chunk_grad_(logits, lse, local_target, here, grad_ce)
    probs = logits.sub_(lse[:, None]).exp_()
    probs.scatter_add_(1, local_target[:, None], -here.to(probs.dtype)[:, None])
    return probs.mul_(grad_ce[:, None])
