"""Activation recomputation with megatron-core's own machinery (`model.recompute_granularity`).

megatron-core recomputes through `tensor_parallel.checkpoint(function, distribute_saved_activations,
*args)` -- whole layers (TransformerBlock, "full") or the core attention (Attention, "selective") --
and that function saves every argument with `ctx.save_for_backward`, which takes tensors only. Our
attention mask is an `AttentionMask` (a dense mask or a FlexAttention BlockMask plus its cache key),
so it would be rejected. `allow_object_arguments()` wraps megatron's `checkpoint` once: tensor
arguments go through it as before, the others (the mask: no gradient, not modified by the forward)
are bound into the recomputed function, so the recomputation sees the same objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from megatron.core import tensor_parallel

__all__ = ["allow_object_arguments"]


def _split_checkpoint(original: Callable) -> Callable:
    def checkpoint(function: Callable, distribute_saved_activations: bool, *args: Any) -> Any:
        if all(a is None or isinstance(a, torch.Tensor) for a in args):
            return original(function, distribute_saved_activations, *args)
        slots = [i for i, a in enumerate(args) if a is None or isinstance(a, torch.Tensor)]
        fixed = list(args)

        def run(*tensors: Any) -> Any:
            full = list(fixed)
            for i, value in zip(slots, tensors, strict=True):
                full[i] = value
            return function(*full)

        return original(run, distribute_saved_activations, *(args[i] for i in slots))

    checkpoint._nbdiff_wrapped = True  # type: ignore[attr-defined]
    return checkpoint


def allow_object_arguments() -> None:
    """Let megatron-core's `tensor_parallel.checkpoint` take non-tensor arguments (idempotent)."""
    current = tensor_parallel.checkpoint
    if getattr(current, "_nbdiff_wrapped", False):
        return
    # Both call sites look the function up as `tensor_parallel.checkpoint` at call time.
    tensor_parallel.checkpoint = _split_checkpoint(current)
