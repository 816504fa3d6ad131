"""What megatron-core says, and what it does not know: warning policy and version checks in one place.

Quiet by default. megatron-core warns at import that Transformer Engine / Apex are absent (expected on
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
turn megatron's fusions off). `defer_megatron_compile()` (installed by
`nbdiff_megatron.install_compat()`) makes torch.compile build each wrapper on that first call instead
while a megatron module executes, in CPU-only processes; a GPU process keeps megatron-core's own
behaviour.

Version differences: a config field that the installed megatron-core does not know is never dropped
silently; `known_fields` raises CompatibilityError naming the fields and the installed version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import types
import warnings
from collections.abc import Iterator
from typing import Any

from nbdiff_megatron.errors import CompatibilityError

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

_installed = False


def quiet_megatron() -> None:
    """Silence megatron-core's optional-dependency warnings (always) and the planned deprecations
    (unless NBDIFF_SHOW_DEPRECATIONS=1), in warnings and in its loggers. Idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
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
    warnings.filterwarnings(
        "ignore",
        message=NON_LEAF_GRAD_NOTICE,
        category=UserWarning,
        module=r"megatron\.core\.optimizer\.optimizer",
    )


def quiet_torch_renames() -> None:
    """Drop torch's FutureWarning on the collectives it renamed, where torch raises it (its c10d
    wrapper, on megatron-core's calls); the same text from anywhere else is still shown."""
    warnings.filterwarnings(
        "ignore",
        message=TORCH_COLLECTIVE_RENAMES,
        category=FutureWarning,
        module=r"torch\.distributed\.c10d_logger",
    )


def quiet_cpu_notices() -> None:
    """In a process without CUDA (model/cpu_compat.apply): drop megatron-core's GPU-only advice."""
    warnings.filterwarnings(
        "ignore",
        message=CUDA_CONNECTIONS_NOTICE,
        category=UserWarning,
        module=r"megatron\.core\.tensor_parallel\.layers",
    )


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
        from importlib.metadata import version

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
    import torch

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
    import torch

    return torch.cuda.is_available()


@contextlib.contextmanager
def _compile_deferred() -> Iterator[None]:
    """torch.compile is `compile_on_first_call` inside (in a CPU-only process; nested: once)."""
    global _real_compile
    if _real_compile is not None or _cuda_present():
        yield
        return
    import torch

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
