"""Compatibility with megatron-core and with a CPU-only torch, in one module, and its one installer.

Nothing here acts on import. `install_compat()` (re-exported as `nbdiff_megatron.install_compat`) installs the
process-wide parts below; the `nbdiff` command and the test set-up call it, and a library user calls it once,
before importing megatron-core (docs/ARCHITECTURE.md, "Compatibility patches").

Warnings: quiet by default. megatron-core warns at import that Transformer Engine / Apex are absent (expected on
CPU and harmless: it falls back to torch), once per module that looks for them -- 14 to 18 lines per
command. `quiet_megatron()` drops those, and the deprecation notices this project has a plan for
(docs/megatron-compat.md): GPTModel -> HybridModel (0.19.x), async_strategy 'mcore' (0.19.x).
Setting NBDIFF_SHOW_DEPRECATIONS=1 shows all of them again (the CI's deprecation job), so the next
break is seen before users see it. The implicit-tp_group notice ("Passing tp_group will be mandatory
soon") is not hidden: the model passes its process groups explicitly (model/builder.py, model/spec.py)
and nothing of ours raises it any more; if it appears, a new call site needs its group.

Start-up cost: megatron-core wraps ~40 of its functions in `torch.compile` as it imports them
(`megatron.core.jit.jit_fuser`, and in 0.19.x `@torch.compile` on a MoE router method). Each wrapper is
built at import, and the first one imports TorchDynamo and Inductor: ~3 s of every process's start-up on
a CPU, for functions that compile on their first call anyway and that a CPU run never calls (our configs
turn megatron's fusions off). `defer_megatron_compile()` makes torch.compile build each wrapper on that
first call instead while a megatron module executes, in CPU-only processes; a GPU process keeps
megatron-core's own behaviour.

Version differences: a config field that the installed megatron-core does not know is never dropped
silently; `known_fields` raises CompatibilityError naming the fields and the installed version.

CPU stand-ins (tests, the demo, gloo multi-rank runs): megatron-core assumes CUDA in a handful of places.
`apply_cpu_patches()` patches exactly those, only when CUDA is absent, and is idempotent. Every patch names
the call site it serves. The patches are written defensively (getattr / hasattr) so that a megatron-core
version that lacks one of the patched names (0.16.1 here, 0.19.x on the clusters) still imports and runs.
`cuda_to_cpu()` is a TorchFunctionMode that maps literal `device="cuda"` arguments to the CPU, for the
pipeline schedules and the optimizer construction; `cuda_type_names()` makes CPU tensors report CUDA type
names to megatron-core's optimizer type checks. With them the CPU runs megatron-core's own optimizer path:
the distributed optimizer on gloo, its gradient clipping, bf16 (docs/GPU.md lists what stays GPU-only).
`patch_local_torch_norm()` is not a CUDA stand-in: the local spec's torch norms get sequence parallelism
and the training dtype on every device. Nor is `multi_tensor_l2_norm_float64`: megatron-core's CPU
fallback for the gradient norm sums fp32 `torch.norm`s, which come out low on long tensors on a CPU.
What is not made to work (GPU-only paths, tested on a GPU machine): Transformer Engine, apex, fused
kernels, CUDA graphs.

megatron-core itself is imported only inside the functions that patch it (`_module`): installing the
warning policy and the import hook must come before megatron-core's first import.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from importlib.metadata import version
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from nbdiff_megatron.errors import CompatibilityError


def install_compat(*, cpu_patches: bool = True) -> None:
    """Install the process-wide compatibility patches; idempotent.

    - megatron-core's import-time `torch.compile` wrappers are built on first call instead, in a
      process without CUDA (start-up time: ~3 s per CPU process; docs/megatron-compat.md). This acts on
      megatron modules imported after the call.
    - megatron-core's optional-dependency warnings and its planned deprecation notices are dropped
      (shown again with NBDIFF_SHOW_DEPRECATIONS=1).
    - `cpu_patches`: megatron-core's CUDA assumptions are patched when CUDA is absent
      (`apply_cpu_patches`; it imports megatron-core). The model builder also applies them when it
      builds a model on a CPU, so the `nbdiff` command passes False: commands that never build a model
      then do not import megatron-core at start-up.
    """
    defer_megatron_compile()
    quiet_megatron()
    if cpu_patches:
        apply_cpu_patches()


SHOW_ENV = "NBDIFF_SHOW_DEPRECATIONS"
TESTED_VERSIONS = ("0.16.1", "0.19.2")

# Optional GPU libraries megatron-core looks for at import (its fallbacks are exact on CPU).
OPTIONAL_DEPENDENCY = re.compile(
    r"(Transformer Engine|Apex|apex|TE) (and Apex )?(is|are) not installed"
    r"|No module named '(transformer_engine|apex|amp_C)'"
)
# Deprecations with a plan in docs/megatron-compat.md, and those megatron-core itself triggers in
# torch or in its own defaults (its to fix); shown with NBDIFF_SHOW_DEPRECATIONS=1.
PLANNED_DEPRECATIONS = re.compile(
    r"GPTModel IS DEPRECATED"
    r"|MCore's async save is deprecated"
    r"|full scope is deprecated"  # TransformerConfig's own cuda_graph_scope default (0.16.x)
    r"|`load_state_dict` is deprecated"  # dist_checkpointing -> torch.distributed.checkpoint
    r"|Please use DTensor instead and we are deprecating ShardedTensor"
    # Notices megatron-core 0.19.x raises on every load (not ours to act on; seen on 3.12 +
    # 0.19.2 when a run loads a converted checkpoint): experimental-module and torch DCP notices.
    r"|MimoModelConfig is experimental"
    r"|torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load"
    r"|The argument order of load has been changed"
)


# torch 2.13 renamed the collectives megatron-core calls (all_gather_into_tensor -> all_gather_single,
# reduce_scatter_tensor -> reduce_scatter_single; ours use the new names, model/attention.py): the
# FutureWarning is raised by torch's c10d wrapper on every multi-rank run, megatron-core's to fix.
TORCH_COLLECTIVE_RENAMES = (
    r"`torch\.distributed\.(?:all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
)
# megatron-core's advice to set CUDA_DEVICE_MAX_CONNECTIONS=1 (kernel order on a GPU; the SLURM
# launcher sets it): meaningless in a process without CUDA, where it is dropped (quiet_cpu_notices).
CUDA_CONNECTIONS_NOTICE = (
    r"When using (?:sequence parallelism|async grad allreduce) it is recommended to set the "
    r"environment variable CUDA_DEVICE_MAX_CONNECTIONS"
)


def show_deprecations() -> bool:
    """True when NBDIFF_SHOW_DEPRECATIONS asks for megatron-core's deprecation notices."""
    return os.environ.get(SHOW_ENV, "").strip().lower() not in ("", "0", "false", "no")


class _DropMessages(logging.Filter):
    """Drops megatron-core log records whose message matches `pattern`."""

    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot format itself is not ours to judge
            return True
        return not self.pattern.search(message)


NON_LEAF_GRAD_NOTICE = (
    r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"
)
"""torch's notice on reading `.grad` of a non-leaf tensor (quiet_optimizer_grad_views)."""

_quiet_installed = False


def quiet_megatron() -> None:
    """Silence megatron-core's optional-dependency warnings (always) and the planned deprecations
    (unless NBDIFF_SHOW_DEPRECATIONS=1), in warnings and in its loggers. Idempotent."""
    global _quiet_installed
    if _quiet_installed:
        return
    _quiet_installed = True
    # warnings' message filters match at the start of the message: hence the leading '.*'.
    warnings.filterwarnings("ignore", message=f".*(?:{OPTIONAL_DEPENDENCY.pattern})")
    pattern = OPTIONAL_DEPENDENCY
    if show_deprecations():
        warnings.filterwarnings("always", category=DeprecationWarning, module=r"megatron\..*")
        warnings.filterwarnings("always", category=FutureWarning, module=r"megatron\..*")
        warnings.filterwarnings("always", message=f".*(?:{PLANNED_DEPRECATIONS.pattern})")
    else:
        warnings.filterwarnings("ignore", message=f".*(?:{PLANNED_DEPRECATIONS.pattern})")
        quiet_torch_renames()
        pattern = re.compile(f"{OPTIONAL_DEPENDENCY.pattern}|{PLANNED_DEPRECATIONS.pattern}")
    # megatron-core logs some of them through its module loggers ("megatron.core...."), and a
    # logger's filters see only the records logged on it: the filter goes on each megatron logger.
    _add_log_filter(_DropMessages(pattern))
    quiet_optimizer_grad_views()


def quiet_optimizer_grad_views() -> None:
    """Drop torch's non-leaf `.grad` notice where megatron-core's optimizer raises it.

    With fp32 parameters the distributed optimizer's main parameters are views of the model's
    parameters (non-leaf tensors); `_zero_grad_group_helper` reads `.grad` on them every step, which
    torch answers with a UserWarning that says nothing actionable (the gradients live in the DDP
    buffers). The same notice from any other module is still shown."""
    _drop_at_source(NON_LEAF_GRAD_NOTICE, UserWarning, r"megatron\.core\.optimizer\.optimizer")


def quiet_torch_renames() -> None:
    """Drop torch's FutureWarning on the collectives it renamed, where torch raises it (its c10d
    wrapper, on megatron-core's calls); the same text from anywhere else is still shown."""
    _drop_at_source(TORCH_COLLECTIVE_RENAMES, FutureWarning, r"torch\.distributed\.c10d_logger")


def quiet_cpu_notices() -> None:
    """In a process without CUDA (apply_cpu_patches): drop megatron-core's GPU-only advice."""
    _drop_at_source(
        CUDA_CONNECTIONS_NOTICE, UserWarning, r"megatron\.core\.tensor_parallel\.layers"
    )


def _drop_at_source(message: str, category: type[Warning], module: str) -> None:
    """Ignore `category` warnings matching `message` raised by `module` (a regex) only: the same
    text raised anywhere else is still shown."""
    warnings.filterwarnings("ignore", message=message, category=category, module=module)


def _add_log_filter(flt: logging.Filter) -> None:
    """Attach `flt` to the megatron loggers that exist and to those created later."""
    manager = logging.Logger.manager
    for name, logger in list(manager.loggerDict.items()):
        if name.startswith("megatron") and isinstance(logger, logging.Logger):
            logger.addFilter(flt)
    original = manager.getLogger

    def get_logger(name: str) -> logging.Logger:
        logger = original(name)
        if name.startswith("megatron") and flt not in logger.filters:
            logger.addFilter(flt)
        return logger

    manager.getLogger = get_logger  # type: ignore[method-assign]


def megatron_core_version() -> str:
    """The installed megatron-core version ('unknown' when it does not say)."""
    try:
        return version("megatron-core")
    except Exception:
        return "unknown"


def known_fields(cls: type, kwargs: dict[str, Any], *, what: str, user_fields: str = "") -> dict:
    """`kwargs` unchanged when megatron-core's dataclass `cls` knows every key; else CompatibilityError.

    A field renamed or removed by a megatron-core release would otherwise vanish without a word.
    `user_fields` names the config field the user filled `kwargs` from (for the fix in the message).
    """
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(kwargs) - known)
    if not unknown:
        return kwargs
    hint = f"remove them from {user_fields}, or " if user_fields else ""
    raise CompatibilityError(
        f"the installed megatron-core {megatron_core_version()} has no {what} field(s) "
        f"{', '.join(unknown)}: {hint}install a tested megatron-core ({' or '.join(TESTED_VERSIONS)}) "
        "and report the rename (docs/megatron-compat.md)"
    )


_real_compile: Any = None
"""torch.compile itself while megatron-core's modules execute (None otherwise)."""


def compile_on_first_call(fn: Any = None, **options: Any) -> Any:
    """`torch.compile` with the wrapper built when `fn` is first called (not when it is defined).

    The same compiled function as `torch.compile(fn, **options)`, which compiles on its first call
    too; only building the wrapper (and importing TorchDynamo for it) moves. Bare, as a decorator, or
    with options; anything but a function or method (a module, a class) is compiled at once.
    """
    compile_now = _real_compile or torch.compile
    if fn is None:
        return functools.partial(compile_on_first_call, **options)
    if not isinstance(fn, (types.FunctionType, types.MethodType)):
        return compile_now(fn, **options)
    compiled = None

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal compiled
        if compiled is None:
            compiled = compile_now(fn, **options)
        return compiled(*args, **kwargs)

    return call


@functools.cache
def _cuda_present() -> bool:
    """torch.cuda.is_available(), asked once per process (not once per megatron module)."""
    return torch.cuda.is_available()


@contextlib.contextmanager
def _compile_deferred() -> Iterator[None]:
    """torch.compile is `compile_on_first_call` inside (in a CPU-only process; nested: once)."""
    global _real_compile
    if _real_compile is not None or _cuda_present():
        yield
        return
    _real_compile = torch.compile
    torch.compile = compile_on_first_call
    try:
        yield
    finally:
        torch.compile = _real_compile
        _real_compile = None


class _MegatronImportHook(importlib.abc.MetaPathFinder):
    """Finds megatron.* modules like the path finder does; each then executes with torch.compile
    deferred (`megatron.core.jit.jit_fuser = torch.compile` included)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "megatron" and not fullname.startswith("megatron."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            with _compile_deferred():
                execute(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def defer_megatron_compile() -> None:
    """Install the hook that defers megatron-core's import-time torch.compile (module docstring).

    Idempotent. It acts on the megatron modules imported after this call.
    """
    if not any(isinstance(finder, _MegatronImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MegatronImportHook())


# CPU stand-ins for megatron-core's CUDA assumptions (module docstring).

_CPU_PATCHES_APPLIED = False
CPU = torch.device("cpu")


def cpu_patches_needed() -> bool:
    """True when torch has no usable CUDA device (the patches are then required)."""
    return not torch.cuda.is_available()


def cpu_patches_applied() -> bool:
    """Whether `apply_cpu_patches()` has patched this process."""
    return _CPU_PATCHES_APPLIED


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


def apply_cpu_patches() -> bool:
    """Patch megatron-core's CUDA assumptions when CUDA is absent; returns True if patches are active.

    Safe to call many times and from every entry point (model builder, tests, training loop). The
    sequence-parallel norm patch is not a CUDA stand-in: it is applied on every device (the local
    spec's torch norms are used on a GPU without Transformer Engine too).
    """
    global _CPU_PATCHES_APPLIED
    patch_local_torch_norm()
    if _CPU_PATCHES_APPLIED:
        return True
    if not cpu_patches_needed():
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

    # The gradient norm: without apex / Transformer Engine, get_grad_norm_fp32 (optimizer/clip_grads.py)
    # sums per-tensor norms from megatron's `local_multi_tensor_l2_norm` (utils.py), i.e. fp32
    # torch.norm, whose CPU kernel loses accuracy with the tensor's size (`multi_tensor_l2_norm_float64`).
    clip_grads = _module("megatron.core.optimizer.clip_grads")
    local_l2_norm = getattr(_module("megatron.core.utils"), "local_multi_tensor_l2_norm", None)
    if local_l2_norm is not None and getattr(clip_grads, "l2_norm_impl", None) is local_l2_norm:
        _patch(clip_grads, "l2_norm_impl", multi_tensor_l2_norm_float64)

    quiet_cpu_notices()  # megatron-core's CUDA_DEVICE_MAX_CONNECTIONS advice means nothing here
    _CPU_PATCHES_APPLIED = True
    return True


def multi_tensor_l2_norm_float64(
    chunk_size: Any,
    noop_flag: Any,
    tensor_lists: list[list[torch.Tensor]],
    per_tensor: bool,
    *args: Any,
) -> tuple[torch.Tensor, None]:
    """megatron-core's `local_multi_tensor_l2_norm` (megatron/core/utils.py) with float64 sums: the
    L2 norm of every tensor in `tensor_lists` together, as a 1-element fp32 tensor, and None.

    The original takes fp32 `torch.norm` of each gradient. PyTorch's vectorised CPU 2-norm kernel
    adds the squares into one vector of fp32 accumulators element after element (`sum` adds in
    cascades instead; pytorch/pytorch#169237, unchanged in torch 2.13): its relative error grows
    with the tensor's length and is biased low (-1e-5 for 1M random values, -7e-5 for 3.2M). On
    the tiny test model (DP = 2, fp32) the 262,144-element embedding gradient's squared norm came
    out 2.2e-4 low: the plain optimizer reported the global norm 8.1e-5 below the float64 norm of
    the reduced gradient, the distributed optimizer, whose shards are half as long, 1.4e-5 below.
    The two disagreed, and clipping scaled by a norm that was too small. Summed in float64, the
    norm is the float64 one to ~1e-7, whatever the tensor's length or shard. Patched where the
    CPU patches apply (no CUDA): CUDA's norm kernel reduces in a tree (docs/megatron-compat.md).
    """
    total = torch.zeros((), dtype=torch.float64)
    for tensors in tensor_lists:
        for tensor in tensors:
            total += torch.linalg.vector_norm(tensor, dtype=torch.float64).square()
    return torch.tensor([float(total.sqrt())], dtype=torch.float32), None


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
    if not cpu_patches_needed():
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
    if not cpu_patches_needed():
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
