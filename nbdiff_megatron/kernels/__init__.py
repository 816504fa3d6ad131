"""Fused loss kernels: the output projection and the NBDiff masked loss in one pass (linear_loss.py)."""

from nbdiff_megatron.kernels.linear_loss import nbdiff_linear_loss

__all__ = ["nbdiff_linear_loss"]
