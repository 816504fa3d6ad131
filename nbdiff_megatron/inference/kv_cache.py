"""A key/value cache around our megatron-core model, kept in our own code (no model/ changes).

megatron-core's inference contexts (`InferenceParams`, `StaticInferenceContext`) changed their API between
0.16.1 and 0.19.x, and they assume causal decoding. The NBDiff decoder needs something they do not offer:
a forward over the active block that *reads* the cache with a bidirectional block mask but does not
*commit* to it. So the cache lives here: a forward pre-hook on every layer's core attention
(NBDiffAttention) receives q/k/v `[s, b, heads_per_rank, d]` after RoPE (our model applies RoPE at the
explicit position ids it is given, so cached keys sit at their real positions), writes the new k/v into
the layer's buffer right after the committed prefix, and hands the attention the whole
`[committed ; new]` k/v. Only a commit advances the committed length; a refinement forward's k/v are
overwritten by the next write. Under tensor parallelism each rank caches its own heads.

`ModelRunner.forward` runs one forward of the model on new tokens with explicit position ids and a dense
project-convention mask (True = may attend) over `[committed keys ; new keys]`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from nbdiff_megatron.errors import InferenceError


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The NBDiffGPTModel inside DDP / Float16Module wrappers (a list means one pipeline stage)."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise InferenceError(
                f"decoding needs the whole model on one pipeline stage, got {len(model)} model chunks; "
                "load the checkpoint with pipeline parallel size 1"
            )
        model = model[0]
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def core_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every layer's core-attention module, in layer order (this pipeline stage's layers)."""
    inner = unwrap_model(model)
    decoder = getattr(inner, "decoder", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise InferenceError(
            f"{type(inner).__name__} has no decoder.layers: the decoder needs a megatron-core GPTModel "
            "built by nbdiff_megatron.model.builder.build_model"
        )
    modules = []
    for layer in layers:
        attention = getattr(getattr(layer, "self_attention", None), "core_attention", None)
        if attention is None:
            raise InferenceError("a transformer layer has no self_attention.core_attention module")
        modules.append(attention)
    return modules


class KVCache:
    """Per-layer key/value buffers `[capacity, b, heads_per_rank, d]` and the committed length.

    Buffers are allocated at the first write (their head count, dtype and device come from the model).
    """

    def __init__(self, num_layers: int, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        self.capacity = capacity
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def write(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v of the new tokens after the committed prefix; return `[committed ; new]` k/v."""
        new = key.shape[0]
        end = self.length + new
        if end > self.capacity:
            raise InferenceError(
                f"KV cache overflow: {end} positions needed, capacity {self.capacity}; raise the "
                "decoder's context length"
            )
        if self.keys[layer] is None:
            shape = (self.capacity, *key.shape[1:])
            self.keys[layer] = key.new_zeros(shape)
            self.values[layer] = value.new_zeros((self.capacity, *value.shape[1:]))
        keys, values = self.keys[layer], self.values[layer]
        keys[self.length : end] = key
        values[self.length : end] = value
        return keys[:end], values[:end]

    def rows(self, rows: torch.Tensor, length: int) -> KVCacheRows:
        """The cache as seen by a forward of the batch rows `rows` only, writing after `length`."""
        return KVCacheRows(self, rows, length)

    def relocate(self, shift: int, capacity: int) -> None:
        """Move every column c to c - shift in buffers of `capacity` columns (the decoder's column
        window slid right by `shift`, or left for a negative one); columns moved out are dropped."""
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                if old is None:
                    continue
                new = old.new_zeros((capacity, *old.shape[1:]))
                lo, hi = max(shift, 0), min(old.shape[0], capacity + shift)
                if hi > lo:
                    new[lo - shift : hi - shift] = old[lo:hi]
                store[layer] = new
        self.capacity = capacity
        self.length -= shift

    def memory_bytes(self) -> int:
        """Bytes held by the allocated buffers."""
        return sum(
            t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None
        )


class KVCacheRows:
    """Some rows of a KVCache, written after their own `length` (not the cache's): a forward of part
    of the batch, e.g. the prompt of a row that was refilled, or the rows whose fused step is redone."""

    def __init__(self, cache: KVCache, rows: torch.Tensor, length: int) -> None:
        self.cache, self.rows, self.length = cache, rows, length

    def write(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v `[n, rows, ...]` at columns length..length+n of those rows; return their
        `[0 : length + n]` k/v."""
        end = self.length + key.shape[0]
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        if keys is None or values is None or end > self.cache.capacity:
            raise InferenceError(
                f"a forward of part of the batch needs a cache already written by the whole batch "
                f"with room for {end} columns (capacity {self.cache.capacity})"
            )
        keys[self.length : end, self.rows] = key
        values[self.length : end, self.rows] = value
        return keys[:end, self.rows], values[:end, self.rows]


@contextlib.contextmanager
def cache_hooks(modules: list[torch.nn.Module], cache: KVCache | KVCacheRows) -> Iterator[None]:
    """Route every core attention's k/v through `cache` for the duration of one forward."""

    def make_hook(layer: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            args = list(args)
            # megatron-core passes (query, key, value, attention_mask, ...) positionally; accept
            # keywords too, for versions that do.
            if len(args) >= 3:
                args[1], args[2] = cache.write(layer, args[1], args[2])
            else:
                kwargs["key"], kwargs["value"] = cache.write(layer, kwargs["key"], kwargs["value"])
            return tuple(args), kwargs

        return hook

    handles = [
        m.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, m in enumerate(modules)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class ModelRunner:
    """Forwards of the model on new tokens, optionally through a KV cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        # lazy: model.attention imports megatron-core; `nbdiff generate --help` imports this module
        from nbdiff_megatron.model.attention import AttentionMask

        self._mask_type = AttentionMask
        self.model = model
        self.inner = unwrap_model(model)
        if not getattr(self.inner, "pre_process", True) or not getattr(
            self.inner, "post_process", True
        ):
            raise InferenceError(
                "the decoder needs the whole model on one rank (pipeline parallel size 1); "
                "load the checkpoint with --pp 1"
            )
        self.attention_modules = core_attention_modules(model)
        self.forward_passes = 0

    @property
    def num_layers(self) -> int:
        """Transformer layers of the model."""
        return len(self.attention_modules)

    @property
    def device(self) -> torch.device:
        """Device of the model's weights."""
        return next(self.inner.parameters()).device

    def new_cache(self, capacity: int) -> KVCache:
        """An empty cache for `capacity` positions (prompt, padding and generated tokens)."""
        return KVCache(self.num_layers, capacity)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        allowed: torch.Tensor,
        *,
        cache: KVCache | KVCacheRows | None = None,
        commit: bool = False,
        commit_columns: int = 0,
    ) -> torch.Tensor:
        """Logits `[b, n, V]` of the new tokens.

        Args:
            tokens, positions: `[b, n]` ids and RoPE positions of the new tokens.
            allowed: `[b, n, K]` (or `[n, K]`), True = may attend, over `K = cache.length + n` keys
                (the whole sequence when `cache` is None).
            cache: read the committed prefix from it, and put the new k/v after it.
            commit: advance the cache over the new tokens (they become part of the prefix).
            commit_columns: advance it over the first `commit_columns` new tokens only (a partial
                commit: the later ones were run for their logits, their k/v are overwritten by the
                next write).
        """
        mask = self._mask_type.dense(allowed)
        self.forward_passes += 1
        if cache is None:
            return self.model(tokens, positions, mask)
        with cache_hooks(self.attention_modules, cache):
            logits = self.model(tokens, positions, mask)
        cache.length += tokens.shape[1] if commit else min(commit_columns, tokens.shape[1])
        return logits
