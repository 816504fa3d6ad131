"""The two vocabulary-wide passes of the fused loss over one chunk of fp32 logits.

``nbdiff_linear_loss`` projects a chunk of loss rows (``logits = hidden @ W_local.T``, one GEMM) and
then needs, per row, two passes over the chunk's vocabulary columns:

- forward, ``chunk_stats``: the row max, ``sum exp(logit - max)`` and the target's logit (0 where the
  target lives on another TP rank's shard), which the TP group then reduces;
- backward, ``chunk_grad_``: ``d logits = (softmax - onehot(target)) * grad_ce`` written in place
  over the logits, so that no second ``rows x V`` buffer exists.

Both may overwrite ``logits``. These are the torch implementations (CPU, and GPU without Triton);
a GPU backend plugs in behind ``backend()`` with the same semantics.
"""

from __future__ import annotations

import torch

__all__ = ["backend", "chunk_grad_", "chunk_stats"]


def backend(logits: torch.Tensor) -> str:
    """The implementation used for ``logits``' device: ``"torch"`` here."""
    del logits
    return "torch"


def chunk_stats(
    logits: torch.Tensor, local_target: torch.Tensor, here: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row_max, sum_exp, target_logit)`` of fp32 ``logits [n, V_local]``; overwrites ``logits``.

    ``local_target [n]`` is each row's target column in this shard (any valid column where
    ``here [n]`` is False: such rows get target logit 0, the TP sum adds the owner's).
    """
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
    probs = logits.sub_(lse[:, None]).exp_()
    probs.scatter_add_(1, local_target[:, None], -here.to(probs.dtype)[:, None])
    return probs.mul_(grad_ce[:, None])
