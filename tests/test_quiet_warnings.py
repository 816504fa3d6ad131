"""The notices that leaked under torchrun are dropped where they arise, and only those: torch's
collective renames raised from its c10d wrapper (megatron-core's calls), megatron-core's
CUDA_DEVICE_MAX_CONNECTIONS advice in a process without CUDA."""

from __future__ import annotations

import warnings

from nbdiff_megatron.megatron_compat import quiet_cpu_notices, quiet_torch_renames

RENAMED = (
    "`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
    "`torch.distributed.all_gather_single` instead."
)
CONNECTIONS = (
    "When using sequence parallelism it is recommended to set the environment variable "
    "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup"
)


def _shown(message: str, category: type[Warning], module: str) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        # The filters that name a message or a module (the package's), then show everything else;
        # the test session's blanket per-category filters (pyproject.toml) set aside.
        warnings.filters[:] = [f for f in warnings.filters if f[1] is not None or f[3] is not None]
        warnings.simplefilter("always", append=True)
        warnings.warn_explicit(
            message, category, f"{module.replace('.', '/')}.py", 1, module=module
        )
    return bool(caught)


def test_named_notices_are_dropped_at_their_source_only() -> None:
    # What quiet_megatron() (every nbdiff command) and apply_cpu_patches() install; pytest gives each
    # test a fresh filter list, so the test installs them itself.
    quiet_torch_renames()
    quiet_cpu_notices()
    assert not _shown(RENAMED, FutureWarning, "torch.distributed.c10d_logger")
    scatter = RENAMED.replace("all_gather_into_tensor", "reduce_scatter_tensor")
    assert not _shown(scatter, FutureWarning, "torch.distributed.c10d_logger")
    assert not _shown(CONNECTIONS, UserWarning, "megatron.core.tensor_parallel.layers")
    # The same text from elsewhere, and other torch deprecations, still reach the user.
    assert _shown(RENAMED, FutureWarning, "nbdiff_megatron.model.attention")
    assert _shown(CONNECTIONS, UserWarning, "megatron.core.other")
    other = "`torch.distributed.reduce_op` is deprecated, please use ReduceOp instead"
    assert _shown(other, FutureWarning, "torch.distributed.c10d_logger")


def test_non_leaf_grad_notice_is_dropped_in_megatron_optimizer_only() -> None:
    # The distributed optimizer with fp32 parameters reads .grad of its main parameters (views of
    # the model's) on every zero_grad: the README's phase loop printed this notice at every step.
    from nbdiff_megatron.megatron_compat import quiet_optimizer_grad_views

    notice = (
        "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. Its .grad "
        "attribute won't be populated during autograd.backward()."
    )
    quiet_optimizer_grad_views()
    assert not _shown(notice, UserWarning, "megatron.core.optimizer.optimizer")
    assert _shown(notice, UserWarning, "nbdiff_megatron.training.loop")
