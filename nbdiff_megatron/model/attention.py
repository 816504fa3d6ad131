"""NBDiffAttention: the core-attention module of the NBDiff layer spec, and the masks it consumes.

megatron-core hands the core attention q/k/v as `[s, b, heads_per_rank, head_dim]` (GQA: fewer k/v heads)
and whatever object the model's forward received as `attention_mask`. This module accepts:

- `AttentionMask` (this project's object, built by `model/builder.py`): a dense boolean mask in the
  project convention (True = MAY attend), run with SDPA; or a FlexAttention `BlockMask`, run with
  FlexAttention (compiled on CUDA).
- a bare FlexAttention `BlockMask`.
- a bare boolean tensor in megatron-core's convention (True = masked OUT), as megatron's own callers pass
  it; `allowed_from_megatron_mask` converts it.
- None: causal attention (megatron's default for GPT).

The mask-convention adapter (`megatron_mask_from_allowed` / `allowed_from_megatron_mask`) lives here and
nowhere else. Queries and keys may have different lengths (prefix + block forwards, KV-cache decoding).

Context parallelism (CP > 1, layout in `model/context_parallel.py`): each CP rank holds the same zigzag
chunks of x_t and of x_0 and an `AttentionMask` whose rows are its own queries' rows over the full 2L keys
and whose `cp_gather_order` says how to put the gathered keys in sequence order. The module all-gathers
K and V (the KV heads only, before any GQA expansion) over the CP group -- the backward reduce-scatters
their gradients -- reorders them into the global order and attends its local queries to all 2L keys.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule

from nbdiff_megatron.errors import ConfigError, NBDiffError

try:  # FlexAttention: torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    HAVE_FLEX = True
except ImportError:  # pragma: no cover - old torch
    BlockMask = None  # type: ignore[assignment,misc]
    create_block_mask = None  # type: ignore[assignment]
    flex_attention = None  # type: ignore[assignment]
    HAVE_FLEX = False

# SDPA's enable_gqa (torch >= 2.5) lets the causal fast path skip materialising repeated k/v heads.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


# ------------------------------------------------------------------------------- mask conventions
def megatron_mask_from_allowed(allowed: torch.Tensor) -> torch.Tensor:
    """Project mask (True = may attend) -> megatron-core boolean mask (True = masked out)."""
    return ~allowed.bool()


def allowed_from_megatron_mask(masked_out: torch.Tensor) -> torch.Tensor:
    """megatron-core boolean mask (True = masked out) -> project mask (True = may attend)."""
    if masked_out.dtype != torch.bool:
        raise TypeError(
            f"attention_mask tensors must be boolean (megatron convention), got {masked_out.dtype}"
        )
    return ~masked_out


def _as_4d(allowed: torch.Tensor) -> torch.Tensor:
    """[Q, K] / [b, Q, K] / [b, 1, Q, K] -> [b or 1, 1, Q, K]."""
    if allowed.dim() == 2:
        return allowed[None, None]
    if allowed.dim() == 3:
        return allowed[:, None]
    if allowed.dim() == 4:
        return allowed
    raise ValueError(f"attention mask must have 2, 3 or 4 dims, got shape {tuple(allowed.shape)}")


@dataclass(frozen=True)
class AttentionMask:
    """The `attention_mask` object our model forwards carry through megatron-core to NBDiffAttention.

    Exactly one of `allowed` (dense, [b or 1, 1, Q, K], True = may attend; SDPA backend) and
    `block_mask` (FlexAttention BlockMask; flex backend) is set.
    """

    allowed: torch.Tensor | None = None
    """Dense mask [b or 1, 1, Q, K], True = may attend (SDPA backend)."""
    block_mask: Any = None
    """FlexAttention BlockMask (flex backend)."""
    mask_mod: Any = None
    """Flex: the full-sequence mask_mod the BlockMask was built from (lets a CP rank build its rows)."""
    cache_key: Any = None
    """Flex: the BlockMaskCache key of `block_mask` (CP shards cache their BlockMask under it + rank)."""
    cp_gather_order: torch.Tensor | None = None
    """CP shard only: LongTensor [K]; gathered keys (rank-major) indexed by it are in sequence order."""

    def __post_init__(self) -> None:
        if (self.allowed is None) == (self.block_mask is None):
            raise ValueError("AttentionMask needs exactly one of `allowed` and `block_mask`")
        if self.allowed is not None:
            object.__setattr__(self, "allowed", _as_4d(self.allowed.bool()))

    @classmethod
    def dense(
        cls, allowed: torch.Tensor, *, cp_gather_order: torch.Tensor | None = None
    ) -> AttentionMask:
        """Wrap a dense project-convention mask ([Q, K], [b, Q, K] or [b, 1, Q, K])."""
        return cls(allowed=allowed, cp_gather_order=cp_gather_order)

    @classmethod
    def flex(
        cls,
        block_mask: Any,
        *,
        mask_mod: Any = None,
        cache_key: Any = None,
        cp_gather_order: torch.Tensor | None = None,
    ) -> AttentionMask:
        """Wrap a FlexAttention BlockMask (optionally with the mask_mod and cache key it came from)."""
        return cls(
            block_mask=block_mask,
            mask_mod=mask_mod,
            cache_key=cache_key,
            cp_gather_order=cp_gather_order,
        )

    @property
    def context_parallel(self) -> bool:
        """True for a CP rank's shard (keys must be gathered over the CP group)."""
        return self.cp_gather_order is not None

    @property
    def backend(self) -> str:
        """ "sdpa" for a dense mask, "flex" for a BlockMask."""
        return "sdpa" if self.allowed is not None else "flex"

    def to_megatron(self) -> torch.Tensor:
        """The dense mask in megatron-core's convention, for megatron's own attention modules."""
        if self.allowed is None:
            raise ValueError("a FlexAttention BlockMask has no dense megatron-core form")
        return megatron_mask_from_allowed(self.allowed)


# ------------------------------------------------------------------------------- flex kernels
FLEX_COMPILE_BACKEND_ENV = "NBDIFF_FLEX_COMPILE_BACKEND"
"""torch.compile backend of FlexAttention. Unset: inductor on CUDA, uncompiled elsewhere (production).
Set (e.g. "eager"): compiled with that backend on every device -- how the tests count compiles on CPU."""
FLEX_RECOMPILE_LIMIT_ENV = "NBDIFF_FLEX_RECOMPILE_LIMIT"
"""Versions each compiled flex function may hold in one process (default `DEFAULT_FLEX_RECOMPILE_LIMIT`)."""
DEFAULT_FLEX_RECOMPILE_LIMIT = 32
"""Room for every shipped command with margin: `nbdiff ablate` compiles 10 attention versions and
`nbdiff eval`'s causal scorer 4 (docs/flex-attention.md has the counts); torch's own default, 8,
was reached by ablate's evaluation."""


class FlexRecompileLimitError(NBDiffError, RuntimeError):
    """A compiled FlexAttention function needed more versions than its recompile limit allows."""


def _recompile_limit_errors() -> tuple[type[BaseException], ...]:
    """What torch raises past a fullgraph function's recompile limit (named differently before 2.6)."""
    from torch._dynamo import exc  # lazy: TorchDynamo imports in ~0.5 s; only flex needs it

    found = (
        getattr(exc, "FailOnRecompileLimitHit", None),
        getattr(exc, "FailOnCacheLimitHit", None),
    )
    return tuple(error for error in found if error is not None)


def _compile_takes_recompile_limit() -> bool:
    return "recompile_limit" in inspect.signature(torch.compile).parameters


class CompiledFlex:
    """`flex_attention` and `create_block_mask` compiled once per process, each with its own limit.

    Past torch's recompile limit a compiled function silently runs uncompiled, and uncompiled flex
    materialises the full score matrix (~[b, heads, 2L, 2L] fp32: an OOM at 8K). Here each function
    is compiled with `fullgraph=True` and a `recompile_limit` of its own (scoped to this callable,
    torch's global config is untouched; `isolate_recompiles`: other compiles of flex elsewhere do not
    count against it), so the limit raises `FlexRecompileLimitError` instead. `dynamic=None` (torch's
    automatic dynamic shapes): the first version is specialised, a dimension that changes (batch,
    sequence length) is compiled dynamic once instead of once per value.
    """

    def __init__(self, backend: str, recompile_limit: int) -> None:
        self.backend = backend
        self.recompile_limit = recompile_limit
        self._limit_errors = _recompile_limit_errors()
        # torch < 2.13 lacks torch.compile(recompile_limit=...): the limit is patched around the call.
        self._per_call_limit = not _compile_takes_recompile_limit()
        self.attention = self._compiled(flex_attention, "flex_attention")
        self.block_mask = self._compiled(create_block_mask, "create_block_mask")

    def _compiled(self, fn: Callable, name: str) -> Callable:
        options: dict[str, Any] = dict(backend=self.backend, dynamic=None, fullgraph=True)
        if not self._per_call_limit:
            options.update(recompile_limit=self.recompile_limit, isolate_recompiles=True)
        compiled = torch.compile(fn, **options)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                with self._limit_scope():
                    return compiled(*args, **kwargs)
            except self._limit_errors as exc:
                raise FlexRecompileLimitError(
                    f"{name} needed more than {self.recompile_limit} compiled versions in this "
                    "process; past the limit torch would run it uncompiled, materialising the full "
                    f"[batch, heads, queries, keys] score or mask tensor. Raise "
                    f"{FLEX_RECOMPILE_LIMIT_ENV} (each version costs one compile) or run the work "
                    "that needs other shapes in another process; TORCH_LOGS=recompiles prints what "
                    "changed between versions (docs/flex-attention.md)"
                ) from exc

        return call

    def _limit_scope(self) -> Any:
        if not self._per_call_limit:
            return contextlib.nullcontext()
        from torch._dynamo import config  # lazy: TorchDynamo imports in ~0.5 s; only flex needs it

        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        return config.patch(**{name: self.recompile_limit})


_COMPILED_FLEX: dict[tuple[str, int], CompiledFlex] = {}
_COMPILED_FLEX_LOCK = threading.Lock()


def flex_recompile_limit() -> int:
    """The recompile limit of the compiled flex functions (`NBDIFF_FLEX_RECOMPILE_LIMIT`)."""
    text = os.environ.get(FLEX_RECOMPILE_LIMIT_ENV, "").strip()
    if not text:
        return DEFAULT_FLEX_RECOMPILE_LIMIT
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ConfigError(f"{FLEX_RECOMPILE_LIMIT_ENV}={text!r} must be a positive integer")
    return limit


def compiled_flex(device: torch.device) -> CompiledFlex | None:
    """The process's compiled flex functions for `device`; None: run flex uncompiled (CPU default).

    Compiled on CUDA (eager flex is an unfused reference, far too slow for GPUs) with inductor, and
    on every device with the backend `NBDIFF_FLEX_COMPILE_BACKEND` names when it is set.
    """
    backend = os.environ.get(FLEX_COMPILE_BACKEND_ENV, "").strip()
    if not backend:
        if device.type != "cuda":
            return None
        backend = "inductor"
    key = (backend, flex_recompile_limit())
    with _COMPILED_FLEX_LOCK:
        if key not in _COMPILED_FLEX:
            _COMPILED_FLEX[key] = CompiledFlex(*key)
        return _COMPILED_FLEX[key]


def reset_compiled_flex() -> None:
    """Forget the compiled flex functions (tests; the next flex call compiles afresh)."""
    with _COMPILED_FLEX_LOCK:
        _COMPILED_FLEX.clear()


def _flex_kernel(device: torch.device) -> Callable:
    compiled = compiled_flex(device)
    return flex_attention if compiled is None else compiled.attention


class BlockMaskCache:
    """LRU cache of FlexAttention BlockMasks keyed by (kind, L, B, document layout, batch, device).

    A training step reuses one mask in every layer and every micro-batch with the same layout (unpacked
    data: every step of a curriculum plateau). Packed batches key on the bytes of their doc_ids.
    """

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.last_build_seconds = 0.0

    @staticmethod
    def layout_key(doc_ids: torch.Tensor | None) -> Any:
        """Hashable description of a document layout (None when unpacked)."""
        if doc_ids is None:
            return None
        flat = doc_ids.detach().to("cpu", torch.int64).contiguous()
        return (tuple(flat.shape), hash(flat.numpy().tobytes()))

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        """The cached mask for `key`, built with `build()` on a miss."""
        with self._lock:
            if key in self._entries:
                self.hits += 1
                self._entries.move_to_end(key)
                return self._entries[key]
        start = time.perf_counter()
        value = build()
        self.last_build_seconds = time.perf_counter() - start
        with self._lock:
            self.misses += 1
            self._entries[key] = value
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        """Drop every cached mask and reset the counters."""
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0


BLOCK_MASK_CACHE = BlockMaskCache()


def build_block_mask(
    mask_mod: Callable, batch: int | None, q_len: int, kv_len: int, device: torch.device | str
) -> Any:
    """A BlockMask for `mask_mod` (heads broadcast; batch None = broadcast over the batch)."""
    if not HAVE_FLEX:
        raise RuntimeError("FlexAttention needs torch >= 2.5; use attention_backend='sdpa'")
    device = torch.device(device)
    compiled = compiled_flex(device)
    build = create_block_mask if compiled is None else compiled.block_mask
    return build(mask_mod, B=batch, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device)


# ------------------------------------------------------------------------------- context parallel
def _all_gather_single(output: torch.Tensor, tensor: torch.Tensor, group: Any) -> None:
    # torch 2.13 renamed all_gather_into_tensor (deprecated alias kept); older torch lacks the new name.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def _reduce_scatter_single(output: torch.Tensor, tensor: torch.Tensor, group: Any) -> None:
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(output, tensor, group=group)


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over a group; backward: reduce-scatter (sum) of the gradient."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        tensor = tensor.contiguous()
        out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
        _all_gather_single(out, tensor, group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        world = dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        # Every CP rank's queries attended to this rank's keys: their gradients add up here.
        _reduce_scatter_single(out, grad, ctx.group)
        return out, None


def gather_sequence(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Autograd-aware all-gather of `[s, ...]` over `group` into `[world * s, ...]` (rank-major)."""
    if dist.get_world_size(group) == 1:
        return tensor
    return _GatherSequence.apply(tensor, group)


def gather_context_parallel_kv(
    key: torch.Tensor, value: torch.Tensor, gather_order: torch.Tensor, group: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V `[s_local, b, hk, d]` of every CP rank, in sequence order: `[s_full, b, hk, d]` each.

    One collective for both (concatenated along the head dim); `gather_order` maps the rank-major
    gathered rows to the sequence order the mask's columns use.
    """
    key_dim = key.shape[-1]
    both = torch.cat([key, value], dim=-1)
    gathered = gather_sequence(both, group)
    if gathered.shape[0] != gather_order.numel():
        raise ValueError(
            f"the CP ranks hold {gathered.shape[0]} keys together, the mask's gather order covers "
            f"{gather_order.numel()}: every CP rank must shard the same micro-batch with the same layout"
        )
    gathered = gathered.index_select(0, gather_order.to(gathered.device))
    return gathered[..., :key_dim], gathered[..., key_dim:]


# ------------------------------------------------------------------------------- the module
class NBDiffAttention(MegatronModule):
    """Core attention over an arbitrary mask: SDPA with a dense mask, or FlexAttention with a BlockMask.

    Constructed by megatron-core's SelfAttention with DotProductAttention's arguments; returns
    `[sq, b, heads_per_rank * head_dim]`.
    """

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any = None,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config)
        self.cp_size = int(getattr(config, "context_parallel_size", 1) or 1)
        # The CP group megatron built this layer for (its pg_collection, 0.16 and 0.19 pass one);
        # None: parallel_state's, looked up at forward time.
        self._cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        head_dim = config.kv_channels
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        attn_mask_type: Any = None,
        attention_bias: Any = None,
        packed_seq_params: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """q [sq, b, hq, d], k/v [sk, b, hk, d] -> [sq, b, hq * d]."""
        if attention_bias is not None:
            raise NotImplementedError("NBDiffAttention does not take an attention_bias")
        if packed_seq_params is not None:
            raise NotImplementedError(
                "NBDiffAttention takes packed documents through the mask (doc_ids), not THD "
                "packed_seq_params"
            )
        sq, batch, hq, head_dim = query.shape
        q = query.permute(1, 2, 0, 3)  # [b, hq, sq, d]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)

        if isinstance(attention_mask, AttentionMask):
            mask = attention_mask
        elif HAVE_FLEX and isinstance(attention_mask, BlockMask):
            mask = AttentionMask.flex(attention_mask)
        elif isinstance(attention_mask, torch.Tensor):
            mask = AttentionMask.dense(allowed_from_megatron_mask(attention_mask))
        elif attention_mask is None:
            mask = None
        else:
            raise TypeError(f"unsupported attention_mask type {type(attention_mask).__name__}")

        if self.cp_size > 1:
            if mask is None or not mask.context_parallel:
                raise ValueError(
                    f"context_parallel_size={self.cp_size}: NBDiffAttention needs this CP rank's "
                    "shard of the inputs; build them with nbdiff_model_inputs(..., cp_layout="
                    "ContextParallelLayout.current(L)) or model.context_parallel.shard_model_inputs"
                )
            key, value = gather_context_parallel_kv(
                key, value, mask.cp_gather_order, self._context_parallel_group()
            )
            k = key.permute(1, 2, 0, 3)
            v = value.permute(1, 2, 0, 3)
        elif mask is not None and mask.context_parallel:
            raise ValueError(
                "the attention mask is a context-parallel shard but the model was built with "
                "context_parallel_size=1: shard the inputs only when the CP size is > 1"
            )

        if mask is not None and mask.backend == "flex":
            out = self._flex(q, k, v, mask.block_mask)
        else:
            out = self._sdpa(q, k, v, None if mask is None else mask.allowed)
        # [b, hq, sq, d] -> [sq, b, hq * d]
        return out.permute(2, 0, 1, 3).reshape(sq, batch, hq * head_dim)

    def _context_parallel_group(self) -> Any:
        if self._cp_group is not None:
            return self._cp_group
        return parallel_state.get_context_parallel_group()

    def _dropout(self) -> float:
        return self.dropout_p if self.training else 0.0

    def _sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None
    ) -> torch.Tensor:
        hq, hk = q.shape[1], k.shape[1]
        extra: dict[str, Any] = {}
        if hq != hk:
            if allowed is None and _SDPA_HAS_GQA:
                extra["enable_gqa"] = True
            else:
                # megatron groups query heads contiguously per k/v head
                k = k.repeat_interleave(hq // hk, dim=1)
                v = v.repeat_interleave(hq // hk, dim=1)
        sq, sk = q.shape[2], k.shape[2]
        is_causal = False
        if allowed is None:
            if sq != sk:
                raise ValueError(
                    "attention_mask=None means causal attention and needs equal query/key lengths; "
                    "pass an AttentionMask for prefix + block forwards"
                )
            is_causal = True
        else:
            if allowed.shape[-2:] != (sq, sk):
                raise ValueError(
                    f"attention mask covers {tuple(allowed.shape[-2:])} query x key positions, the "
                    f"attention has {(sq, sk)}"
                )
            allowed = allowed.to(q.device)
        dropout = self._dropout()
        if dropout > 0.0:
            # Heads are split across TP ranks: draw dropout from the model-parallel RNG stream.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=allowed,
                    dropout_p=dropout,
                    is_causal=is_causal,
                    scale=self.softmax_scale,
                    **extra,
                )
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, is_causal=is_causal, scale=self.softmax_scale, **extra
        )

    def _flex(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any
    ) -> torch.Tensor:
        if not HAVE_FLEX:
            raise RuntimeError("FlexAttention needs torch >= 2.5; use attention_backend='sdpa'")
        if self._dropout() > 0.0:
            raise NotImplementedError(
                "FlexAttention has no attention dropout: use the sdpa backend"
            )
        hq, hk = q.shape[1], k.shape[1]
        kernel = _flex_kernel(q.device)
        return kernel(q, k, v, block_mask=block_mask, scale=self.softmax_scale, enable_gqa=hq != hk)
