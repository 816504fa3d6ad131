"""Patches that let megatron-core run on a CPU-only torch (tests, the demo, gloo multi-rank runs).

megatron-core assumes CUDA in a handful of places. `apply()` patches exactly those, only when CUDA is
absent, and is idempotent. Every patch names the call site it serves. The patches are written defensively
(getattr / hasattr) so that a megatron-core version that lacks one of the patched names (0.16.1 here, 0.19.x
on the clusters) still imports and runs. `cuda_to_cpu()` is a TorchFunctionMode that maps literal
`device="cuda"` arguments to the CPU, for the pipeline schedules and the optimizer construction;
`cuda_type_names()` makes CPU tensors report CUDA type names to megatron-core's optimizer type checks.
With them the CPU runs megatron-core's own optimizer path: the distributed optimizer on gloo, its
gradient clipping, bf16 (docs/GPU.md lists what stays GPU-only). `patch_local_torch_norm()` is not a
CUDA stand-in: the local spec's torch norms get sequence parallelism and the training dtype on every
device.

What is not made to work (GPU-only paths, tested on a GPU machine): Transformer Engine, apex, fused
kernels, CUDA graphs.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from nbdiff_megatron.megatron_compat import quiet_cpu_notices

_APPLIED = False
CPU = torch.device("cpu")


def needed() -> bool:
    """True when torch has no usable CUDA device (the patches are then required)."""
    return not torch.cuda.is_available()


def is_applied() -> bool:
    """Whether `apply()` has patched this process."""
    return _APPLIED


class _NullStream:
    """Stand-in for torch.cuda.Stream: every operation is a no-op on the CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.device = CPU

    def wait_stream(self, stream: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def record_event(self, event: Any = None) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def __enter__(self) -> _NullStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _null_stream_context(stream: Any = None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _cpu_get_rng_state(
    device: Any = "cuda", clone: bool = False, graph_safe: bool = False, **_: Any
) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(
    new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False, **_: Any
) -> None:
    torch.set_rng_state(new_state)


def _patch(owner: Any, name: str, value: Any) -> None:
    """Set owner.name = value, keeping the original once under `_nbdiff_orig_<name>`."""
    if owner is None:
        return
    keep = f"_nbdiff_orig_{name}"
    if hasattr(owner, name) and not hasattr(owner, keep):
        setattr(owner, keep, getattr(owner, name))
    setattr(owner, name, value)


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception:  # a module missing in this megatron-core version: nothing to patch there
        return None


def apply() -> bool:
    """Patch megatron-core's CUDA assumptions when CUDA is absent; returns True if patches are active.

    Safe to call many times and from every entry point (model builder, tests, training loop). The
    sequence-parallel norm patch is not a CUDA stand-in: it is applied on every device (the local
    spec's torch norms are used on a GPU without Transformer Engine too).
    """
    global _APPLIED
    patch_local_torch_norm()
    if _APPLIED:
        return True
    if not needed():
        return False

    # torch.cuda.current_device() used as a device argument: RotaryEmbedding.__init__/get_emb
    # (models/common/embeddings/rotary_pos_embedding.py), GlobalMemoryBuffer.get_tensor (utils.py),
    # p2p_communication._communicate_shapes/_communicate buffers, param_and_grad_buffer buffers,
    # DistributedDataParallel communication stream.
    _patch(torch.cuda, "current_device", lambda: CPU)

    # torch.cuda.synchronize(): p2p_communication._communicate (also off via batch_p2p_sync=False),
    # DistributedDataParallel.offload/restore_grad_buffers, utils straggler timers.
    _patch(torch.cuda, "synchronize", lambda device=None: None)

    # Streams: DistributedDataParallel.__init__ (torch.cuda.Stream for overlapped grad reduce),
    # param_and_grad_buffer._ParamAndGradBucketGroup.start_grad_sync / finish_grad_sync
    # (torch.cuda.stream, default_stream, current_stream().wait_stream).
    _patch(torch.cuda, "Stream", _NullStream)
    _patch(torch.cuda, "current_stream", lambda device=None: _NullStream())
    _patch(torch.cuda, "default_stream", lambda device=None: _NullStream())
    _patch(torch.cuda, "stream", _null_stream_context)

    # RNG. CudaRNGStatesTracker.add / fork and model_parallel_cuda_manual_seed
    # (tensor_parallel/random.py) call torch.cuda.manual_seed / get_rng_state and the module's own
    # _get_cuda_rng_state / _set_cuda_rng_state: route them to the CPU default generator, so dropout
    # under `tracker.fork()` and CPU weight init stay reproducible. manual_seed_all is deliberately
    # left alone: torch.manual_seed calls it, and routing it to torch.manual_seed would recurse.
    _patch(torch.cuda, "manual_seed", lambda seed: torch.manual_seed(seed))
    _patch(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    _patch(
        torch.cuda, "set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state)
    )
    random_mod = _module("megatron.core.tensor_parallel.random")
    if random_mod is not None:
        if hasattr(random_mod, "_get_cuda_rng_state"):
            _patch(random_mod, "_get_cuda_rng_state", _cpu_get_rng_state)
        if hasattr(random_mod, "_set_cuda_rng_state"):
            _patch(random_mod, "_set_cuda_rng_state", _cpu_set_rng_state)
    # CheckpointFunction (activation recompute) imported the helpers by name in some versions.
    for name in ("megatron.core.tensor_parallel", "megatron.core.transformer.cuda_graphs"):
        mod = _module(name)
        if mod is not None:
            if hasattr(mod, "_get_cuda_rng_state"):
                _patch(mod, "_get_cuda_rng_state", _cpu_get_rng_state)
            if hasattr(mod, "_set_cuda_rng_state"):
                _patch(mod, "_set_cuda_rng_state", _cpu_set_rng_state)

    quiet_cpu_notices()  # megatron-core's CUDA_DEVICE_MAX_CONNECTIONS advice means nothing here
    _APPLIED = True
    return True


def patch_local_torch_norm() -> None:
    """The local spec's torch norms (transformer/torch_norm.py) as TE's and apex's norms behave, on
    any device: sequence parallelism and the training dtype.

    - `WrappedTorchNorm.__new__` asserts `not config.sequence_parallel` (only apex / TE norms carry
      the flag). Under SP a norm sees this rank's sequence shard, so its weight gradient is partial:
      the norm is built as usual and its parameters are tagged `sequence_parallel = True`, the
      attribute megatron's `finalize_model_grads` looks for to all-reduce those gradients over the
      TP group (what apex's FusedLayerNorm and TE's norms do).
    - It builds the torch norm in torch's default dtype (fp32) whatever `config.params_dtype` says;
      under bf16 the norm would then run unfused on bf16 inputs with fp32 weights. Its parameters
      are cast to `params_dtype`, as TE's norms are created (the optimizer keeps fp32 main copies
      of every bf16 parameter).
    """
    norm_mod = _module("megatron.core.transformer.torch_norm")
    wrapped = getattr(norm_mod, "WrappedTorchNorm", None)
    if wrapped is None or hasattr(wrapped, "_nbdiff_orig___new__"):
        return
    original = wrapped.__new__

    def __new__(cls: Any, config: Any, *args: Any, **kwargs: Any) -> Any:
        sequence_parallel = getattr(config, "sequence_parallel", False)
        if sequence_parallel:
            config = copy.copy(config)
            config.sequence_parallel = False
        norm = original(cls, config, *args, **kwargs)
        dtype = getattr(config, "params_dtype", None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            norm = norm.to(dtype=dtype)
        if sequence_parallel:
            for param in norm.parameters():
                param.sequence_parallel = True
        return norm

    _patch(wrapped, "__new__", __new__)


def _to_cpu_device(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("cuda"):
        return CPU
    if isinstance(value, torch.device) and value.type == "cuda":
        return CPU
    if isinstance(value, int) and not isinstance(value, bool):
        # An integer device index means a CUDA ordinal in the call sites we serve.
        return CPU
    return value


class CudaToCpuMode(TorchFunctionMode):
    """Rewrite `device="cuda"` (and `.cuda()`, `.to("cuda")`) to the CPU inside its scope.

    Serves the literal CUDA tensors of pipeline_parallel/schedules.py (`total_num_tokens =
    torch.zeros(..., device="cuda")`), the default causal mask of some versions, FP32Optimizer.__init__
    and dist_checkpointing exchange utils.
    """

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.to and args:
            args = (args[0],) + tuple(
                _to_cpu_device(a) if isinstance(a, (str, torch.device)) else a for a in args[1:]
            )
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_to_cpu() -> Iterator[None]:
    """Map literal CUDA devices to the CPU in this scope when CUDA is absent (no-op with CUDA)."""
    if not needed():
        yield
        return
    with CudaToCpuMode():
        yield


def _cuda_type_name(name: Any) -> Any:
    """'torch.FloatTensor' -> 'torch.cuda.FloatTensor' (other values unchanged)."""
    if isinstance(name, str) and name.startswith("torch.") and not name.startswith("torch.cuda."):
        return "torch.cuda." + name[len("torch.") :]
    return name


@contextlib.contextmanager
def cuda_type_names() -> Iterator[None]:
    """In this scope `tensor.type()` (no argument) names CPU tensors as CUDA ones when CUDA is absent.

    megatron-core's optimizers sort parameters by type-name strings: the distributed optimizer's
    `_build_model_and_main_param_groups` and `__init__`, Float16OptimizerWithFloat16Params.__init__
    (bf16 parameters get fp32 main copies) and `clip_grad_by_total_norm_fp32` compare `param.type()`
    with 'torch.cuda.FloatTensor' / 'HalfTensor' / 'BFloat16Tensor' and raise for anything else. The
    dtype is what those checks are about; the device is the CPU's. Only the no-argument form is
    changed (`t.type(torch.float16)` converts as usual), and only inside the scope.
    """
    if not needed():
        yield
        return
    original = torch.Tensor.type

    def type_(self: torch.Tensor, dtype: Any = None, *args: Any, **kwargs: Any) -> Any:
        if dtype is None and not args and not kwargs:
            return _cuda_type_name(original(self))
        return original(self, dtype, *args, **kwargs)

    torch.Tensor.type = type_  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]


@contextlib.contextmanager
def megatron_optimizer_on_cpu() -> Iterator[None]:
    """Both stand-ins megatron-core's optimizer code needs on a CPU: literal CUDA devices mapped to
    the CPU (`cuda_to_cpu`) and CUDA type names (`cuda_type_names`); no-op with CUDA."""
    with cuda_to_cpu(), cuda_type_names():
        yield
