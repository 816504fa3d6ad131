"""Build the NBDiff GPT model on megatron-core and run it on x_t ⊕ x_0.

Layout and conventions (docs/METHOD.md §3):

- Training input is `input_ids = [x_t ; x_0]`, `[b, 2L]`; both halves carry position ids 0..L-1
  (restarting per packed document). RoPE is applied from these position ids (megatron-core's GPTModel
  ignores `position_ids` under RoPE; `NBDiffGPTModel` fixes that), per sample, so a packed batch whose
  samples have different document layouts is exact.
- Logits are `[b, 2L, V]` with V the REAL vocabulary (padding rows of the embedding table are sliced off,
  or, for vocab-parallel outputs, pushed to the dtype's minimum so they never win): `logits[:, :L]` are
  the x_t half (the diffusion predictions), `logits[:, L:]` the x_0 half (the causal AR predictions). Row i
  of a half is the output at position i of that half; whether it predicts token i or i+1 (token shift) is
  the loss's business.
- Masks follow the project convention, True = MAY attend. They reach the core attention inside an
  `AttentionMask`; `attention.py` holds the only conversion to megatron-core's True = masked-out form.

Under pipeline parallelism every stage calls the model with the same `ModelInputs` (built by
`nbdiff_model_inputs`, cheap and deterministic); the forward step given to `get_forward_backward_func`
is then `output = model(*inputs)` plus the loss on the last stage.

Under context parallelism (CP > 1) each CP rank runs on its shard of the micro-batch:
`nbdiff_model_inputs(..., cp_layout=ContextParallelLayout.current(L))` returns `[b, 2L/cp]` inputs, the
logits are `[b, 2L/cp, V]` (row k is global position `cp_layout.global_positions()[k]`), and the loss is
`model.context_parallel.cp_local_loss` (layout and reduction: that module's docstring).
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import megatron.core
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection

from nbdiff_megatron.errors import ConfigError
from nbdiff_megatron.megatron_compat import apply_cpu_patches, cuda_to_cpu
from nbdiff_megatron.method.masks import (
    MASK_KINDS,
    document_positions,
    prefix_block_mask,
    training_mask,
    training_mask_mod,
    training_position_ids,
)
from nbdiff_megatron.model.attention import (
    BLOCK_MASK_CACHE,
    AttentionMask,
    BlockMaskCache,
    build_block_mask,
)
from nbdiff_megatron.model.config import ModelConfig
from nbdiff_megatron.model.context_parallel import (
    ContextParallelLayout,
    local_flex_mask,
    shard_model_inputs,
)
from nbdiff_megatron.model.parallel import initialize_parallel
from nbdiff_megatron.model.recompute import allow_object_arguments
from nbdiff_megatron.model.spec import (
    nbdiff_block_spec,
    nbdiff_layer_spec,
    uses_transformer_engine,
)


# ------------------------------------------------------------------------------- RoPE from position ids
class PositionIdsRotaryEmbedding(RotaryEmbedding):
    """megatron-core's RotaryEmbedding, evaluated at given position ids instead of 0..s-1.

    GPTModel calls `self.rotary_pos_emb(rotary_seq_len, ...)` with a length only; `NBDiffGPTModel` sets
    `position_ids` ([b, s] or [s]) just before, and this returns `[s, b, 1, d]` (or `[s, 1, 1, d]`), which
    megatron's unfused `apply_rotary_pos_emb` broadcasts over heads per sample.

    Under context parallelism megatron asks for `cp * s_local` positions and would cut its table with
    `get_pos_emb_on_this_cp_rank`; the position ids here are already the local tokens' (the CP shard
    keeps them), so the table is evaluated at them and never re-sliced.
    """

    position_ids: torch.Tensor | None = None

    def forward(
        self,
        max_seq_len: int,
        offset: int = 0,
        packed_seq: bool = False,
        cp_group: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        position_ids = self.position_ids
        if position_ids is None:
            position_ids = torch.arange(max_seq_len, device=self.inv_freq.device) + offset
        group = cp_group if cp_group is not None else getattr(self, "cp_group", None)
        cp_size = group.size() if group is not None and not packed_seq else 1
        if position_ids.shape[-1] * cp_size != max_seq_len:
            raise ValueError(
                f"position_ids cover {position_ids.shape[-1]} tokens (x CP size {cp_size}), the "
                f"sequence has {max_seq_len}"
            )
        inv_freq = self.inv_freq.to(position_ids.device)
        positions = position_ids.to(inv_freq.dtype)
        if self.seq_len_interpolation_factor is not None:
            positions = positions / self.seq_len_interpolation_factor
        freqs = positions.unsqueeze(-1) * inv_freq  # [..., s, d/2]
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
        if emb.dim() == 2:  # [s, d]
            return emb[:, None, None, :]
        return emb.transpose(0, 1).unsqueeze(2).contiguous()  # [b, s, d] -> [s, b, 1, d]


class NBDiffGPTModel(GPTModel):
    """GPTModel with RoPE from real position ids, real-vocab logits and an optional hidden-state output.

    `forward(input_ids [b, s], position_ids [b, s] or [s], attention_mask, ..., return_hidden=False)`
    returns logits `[b, s, V]` on the last pipeline stage (the final-norm hidden states `[b, s, h]` when
    `return_hidden`), and the stage's hidden states `[s, b, h]` elsewhere.
    """

    real_vocab_size: int = 0

    def __init__(self, *args: Any, real_vocab_size: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.real_vocab_size = real_vocab_size
        self._return_hidden = False
        rotary = getattr(self, "rotary_pos_emb", None)
        if isinstance(rotary, RotaryEmbedding) and type(rotary) is RotaryEmbedding:
            # Keep megatron's constructed state (inv_freq with scaling, cp group) and only change how
            # the table is evaluated; avoids re-deriving constructor arguments across versions.
            rotary.__class__ = PositionIdsRotaryEmbedding

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: Any,
        *args: Any,
        return_hidden: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        rotary = getattr(self, "rotary_pos_emb", None)
        if isinstance(rotary, PositionIdsRotaryEmbedding):
            rotary.position_ids = position_ids
        self._return_hidden = return_hidden
        try:
            output = super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        finally:
            if isinstance(rotary, PositionIdsRotaryEmbedding):
                rotary.position_ids = None
            self._return_hidden = False
        if not self.post_process or return_hidden or kwargs.get("labels") is not None:
            return output
        return self._real_vocab(output)

    def _postprocess(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._return_hidden and self.post_process:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            return hidden.transpose(0, 1).contiguous()  # [s, b, h] -> [b, s, h]
        return super()._postprocess(*args, **kwargs)

    def _real_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Drop (gathered) or neutralise (vocab-parallel) the padded vocabulary columns."""
        width = logits.shape[-1]
        padded = self.vocab_size
        if width == padded:
            return logits[..., : self.real_vocab_size]
        # Vocab-parallel shard: columns [rank * width, (rank + 1) * width) of the padded vocab.
        start = parallel_state.get_tensor_model_parallel_rank() * width
        first_pad = max(0, min(width, self.real_vocab_size - start))
        if first_pad == width:
            return logits
        fill = torch.finfo(logits.dtype).min
        keep = torch.arange(width, device=logits.device) < first_pad
        return logits.masked_fill(~keep, fill)


# ------------------------------------------------------------------------------- build
def _parallel_sizes() -> tuple[int, int, int]:
    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_context_parallel_world_size(),
    )


def model_process_groups() -> Any:
    """The process groups the model is built for, passed explicitly (megatron-core is making them
    mandatory): parallel_state's groups, the collection GPTModel would otherwise build itself
    (0.16.1 and 0.19.2), so the model and its layers are the same either way."""
    return ProcessGroupCollection.use_mpu_process_groups()


# GPTModel arguments passed with their "off" values (megatron-core's own defaults): an installed
# megatron-core without them loses nothing when they are left out.
_OFF_VALUES: dict[str, Any] = {
    "rope_scaling": False,
    "rope_scaling_factor": 8.0,
    "seq_len_interpolation_factor": None,
    "vp_stage": None,
}


def _droppable(name: str, value: Any) -> bool:
    if name == "pg_collection":  # parallel_state's groups: what GPTModel builds when not given them
        return True
    return name in _OFF_VALUES and value == _OFF_VALUES[name]


def _filtered_kwargs(fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` without the arguments `fn` (GPTModel.__init__) does not accept, when leaving them
    out changes nothing; an unknown argument that carries a setting (e.g. rope_scaling=True) raises
    ConfigError instead of being dropped silently."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    lost = sorted(k for k, v in kwargs.items() if k not in params and not _droppable(k, v))
    if lost:
        raise ConfigError(
            f"the installed megatron-core ({getattr(megatron.core, '__version__', '?')}) GPTModel "
            f"does not accept {', '.join(lost)}, which this model config sets "
            f"({', '.join(f'{k}={kwargs[k]!r}' for k in lost)}); install a megatron-core that "
            "supports it, or change the model section (e.g. model.rope_scaling)"
        )
    return {k: v for k, v in kwargs.items() if k in params}


def _check_attention_backend(cfg: ModelConfig) -> None:
    """Refuse the attention backend choices that cannot train (before any weight is built)."""
    if cfg.resolved_attention_backend() != "flex":
        return
    if cfg.attention_dropout > 0:
        raise ConfigError(
            "model.attention_dropout > 0 needs model.attention_backend='sdpa' (FlexAttention has no "
            "attention dropout)"
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            "model.attention_backend='flex' has no backward on CPU: use 'sdpa' (or 'auto') on CPU"
        )


def _position_embedding_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """GPTModel's RoPE arguments for this config (base, optional Llama-3 / linear scaling)."""
    rope = cfg.rope_kwargs()
    base = rope["rotary_base"]
    return dict(
        position_embedding_type="rope",
        rotary_percent=1.0,
        # GPTModel declares rotary_base an int: pass an integral base as one, a fractional one as is
        rotary_base=int(base) if float(base).is_integer() else base,
        rope_scaling=rope.get("rope_scaling", False),
        rope_scaling_factor=rope.get("rope_scaling_factor", 8.0),
        seq_len_interpolation_factor=rope.get("seq_len_interpolation_factor"),
    )


def build_model(
    cfg: ModelConfig,
    *,
    block_size: int | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    parallel_output: bool = False,
    vp_stage: int | None = None,
    seed: int | None = None,
    use_transformer_engine: bool | None = None,
    sequence_parallel: bool = False,
) -> NBDiffGPTModel:
    """Build this rank's stage of the NBDiff model from a ModelConfig.

    Uses megatron-core's parallel_state (initialised by the caller, e.g.
    `model.parallel.initialize_parallel`); without torch.distributed a 1-rank gloo group is started.
    `block_size` (the target B) is validated against `seq_length`. `use_transformer_engine` overrides
    `cfg.transformer_impl` (model/spec.py). `seed` re-seeds the CPU and model-
    parallel RNGs first, so equal seeds give equal weights on CPU. `parallel_output=True` keeps the
    logits vocab-parallel under TP (for a vocab-parallel fused loss). `sequence_parallel` turns on
    megatron's sequence parallelism (with TP > 1): activations outside the TP regions, and the hidden
    states `return_hidden` gives, are then the rank's `[b, s / tp, h]` sequence shard.
    """
    apply_cpu_patches()
    if not parallel_state.model_parallel_is_initialized():
        initialize_parallel(1, 1, 1)
    tp, pp, cp = _parallel_sizes()
    cfg.validate(tp=tp, pp=pp, cp=cp, block_size=block_size)
    _check_attention_backend(cfg)
    if seed is not None:
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)

    config = cfg.to_transformer_config(tp=tp, pp=pp, cp=cp, sequence_parallel=sequence_parallel)
    if cfg.recompute_granularity is not None:
        allow_object_arguments()
    if use_transformer_engine is None:
        use_transformer_engine = uses_transformer_engine(cfg.transformer_impl)
    layer_spec = nbdiff_layer_spec(
        qk_layernorm=cfg.qk_layernorm, use_transformer_engine=use_transformer_engine
    )
    spec = nbdiff_block_spec(
        config, layer_spec, use_transformer_engine=use_transformer_engine, vp_stage=vp_stage
    )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(
            ignore_virtual=vp_stage is None, vp_stage=vp_stage
        )
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(
            ignore_virtual=vp_stage is None, vp_stage=vp_stage
        )
    kwargs = dict(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=cfg.padded_vocab_size(tp),
        max_sequence_length=2 * cfg.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        vp_stage=vp_stage,
        pg_collection=model_process_groups(),
        **_position_embedding_kwargs(cfg),
    )
    kwargs = _filtered_kwargs(GPTModel.__init__, kwargs)
    with cuda_to_cpu():
        model = NBDiffGPTModel(real_vocab_size=cfg.vocab_size, **kwargs)
    model.nbdiff_config = cfg
    if torch.cuda.is_available():
        model = model.cuda()
    return model


# ------------------------------------------------------------------------------- inputs
class ModelInputs(NamedTuple):
    """Positional arguments of `NBDiffGPTModel.forward` for one micro-batch."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: AttentionMask


def _resolve_backend(backend: str | None, device: torch.device) -> str:
    if backend in (None, "auto"):
        return "flex" if device.type == "cuda" else "sdpa"
    if backend not in ("sdpa", "flex"):
        raise ConfigError(f"attention backend {backend!r} is unknown: use 'sdpa', 'flex' or 'auto'")
    return backend


def _check_batch(name: str, ids: torch.Tensor) -> None:
    if ids.dim() != 2:
        raise ValueError(f"{name} must be a LongTensor [b, L], got shape {tuple(ids.shape)}")


def nbdiff_model_inputs(
    x_t: torch.Tensor,
    x0: torch.Tensor,
    *,
    block_size: int,
    kind: str = "context_causal",
    doc_ids: torch.Tensor | None = None,
    backend: str | None = "sdpa",
    cache: BlockMaskCache | None = BLOCK_MASK_CACHE,
    cp_layout: ContextParallelLayout | None = None,
    turn_ids: torch.Tensor | None = None,
    annealed_draw: torch.Tensor | None = None,
) -> ModelInputs:
    """Model inputs of the x_t ⊕ x_0 training forward (docs/METHOD.md §3).

    Args:
        x_t, x0: LongTensor [b, L], the noised and the clean sequence.
        block_size: B (the current curriculum block size), 1 <= B <= L.
        kind: "context_causal", "block_causal" or "annealed" (then `annealed_draw` [b, L, B] from
            `method.masks.annealed_draw`, drawn like the noise; its flex BlockMask is never cached).
        doc_ids: optional [b, L] (or [L]) non-decreasing document ids of packed documents.
        turn_ids: optional [b, L] (or [L]) turn ids of multi-turn SFT samples (`method/masks.py`):
            no token attends past the end of its own turn.
        backend: "sdpa" (dense mask), "flex" (BlockMask, cached in `cache`) or "auto"/None (by device).
        cp_layout: context parallelism: return this CP rank's shard (`model/context_parallel.py`);
            flex builds only the rank's BlockMask rows (cached per layout and CP rank).

    Returns:
        `ModelInputs(input_ids [b, 2L], position_ids [b, 2L], attention_mask)`; with `cp_layout`,
        `[b, 2L/cp]` inputs of the rank's tokens and the mask rows of its queries over all 2L keys.
    """
    _check_batch("x_t", x_t)
    _check_batch("x0", x0)
    if x_t.shape != x0.shape:
        raise ValueError(f"x_t {tuple(x_t.shape)} and x0 {tuple(x0.shape)} must have equal shapes")
    batch, length = x0.shape
    if not isinstance(block_size, int) or block_size < 1 or block_size > length:
        raise ConfigError(
            f"block_size={block_size} must be an integer in [1, L={length}]: lower the block size or "
            "raise model.seq_length"
        )
    if kind not in MASK_KINDS:
        raise ConfigError(f"mask kind {kind!r} is unknown: use one of {', '.join(MASK_KINDS)}")
    device = x0.device
    backend = _resolve_backend(backend, device)
    doc_ids = _per_sample(doc_ids, batch, length, device)
    turn_ids = _per_sample(turn_ids, batch, length, device)
    if annealed_draw is not None:
        annealed_draw = annealed_draw.to(device)
    if cp_layout is not None and cp_layout.seq_length != length:
        raise ConfigError(
            f"the context-parallel layout is for L = {cp_layout.seq_length}, the batch has L = {length}"
        )
    input_ids = torch.cat([x_t, x0], dim=1)
    if doc_ids is None:
        position_ids = training_position_ids(length).to(device).expand(batch, 2 * length)
    else:
        position_ids = training_position_ids(length, doc_ids)
    if backend == "sdpa":
        allowed = training_mask(
            length, block_size, kind, doc_ids, turn_ids=turn_ids, annealed_draw=annealed_draw
        ).to(device)
        inputs = ModelInputs(input_ids, position_ids, AttentionMask.dense(allowed))
        return inputs if cp_layout is None else shard_model_inputs(inputs, cp_layout, cache=cache)
    return _flex_inputs(
        input_ids,
        position_ids,
        block_size=block_size,
        kind=kind,
        doc_ids=doc_ids,
        turn_ids=turn_ids,
        annealed_draw=annealed_draw,
        cache=cache,
        cp_layout=cp_layout,
    )


def _per_sample(
    ids: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> torch.Tensor | None:
    """Per-token ids ([L] or [b, L]) as [b, L] on `device` (None stays None)."""
    if ids is None:
        return None
    ids = ids.to(device)
    return ids.expand(batch, length) if ids.dim() == 1 else ids


def _flex_inputs(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    block_size: int,
    kind: str,
    doc_ids: torch.Tensor | None,
    turn_ids: torch.Tensor | None,
    annealed_draw: torch.Tensor | None,
    cache: BlockMaskCache | None,
    cp_layout: ContextParallelLayout | None,
) -> ModelInputs:
    """`nbdiff_model_inputs` with the flex backend: a BlockMask of the training mask_mod, cached by
    layout (never for the annealed kind), or this CP rank's rows of it."""
    batch, length = input_ids.shape[0], input_ids.shape[1] // 2
    device = input_ids.device
    per_sample = doc_ids is not None or turn_ids is not None or annealed_draw is not None
    mask_batch = batch if per_sample else None
    mask_mod = training_mask_mod(
        length, block_size, kind, doc_ids, turn_ids=turn_ids, annealed_draw=annealed_draw
    )
    key = (
        "nbdiff",
        kind,
        length,
        block_size,
        BlockMaskCache.layout_key(doc_ids),
        BlockMaskCache.layout_key(turn_ids),
        mask_batch,
        str(device),
    )
    if kind == "annealed":
        cache, key = None, None  # a fresh random draw every micro-batch: nothing to reuse
    if cp_layout is not None:
        mask = local_flex_mask(
            mask_mod, cp_layout, batch=mask_batch, device=device, cache_key=key, cache=cache
        )
        return ModelInputs(cp_layout.shard(input_ids), cp_layout.shard(position_ids), mask)

    def build() -> Any:
        return build_block_mask(mask_mod, mask_batch, 2 * length, 2 * length, device)

    block_mask = cache.get(key, build) if cache is not None else build()
    return ModelInputs(
        input_ids, position_ids, AttentionMask.flex(block_mask, mask_mod=mask_mod, cache_key=key)
    )


def _causal_allowed(
    length: int, doc_ids: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    idx = torch.arange(length, device=device)
    allowed = idx[None, :] <= idx[:, None]
    if doc_ids is not None:
        allowed = allowed & (doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2))
    return allowed


def _causal_mask_mod(doc_ids: torch.Tensor | None) -> Any:
    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        keep = kv_idx <= q_idx
        if doc_ids is not None:
            keep = keep & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        return keep

    return mask_mod


def ar_model_inputs(
    x0: torch.Tensor,
    *,
    doc_ids: torch.Tensor | None = None,
    backend: str | None = "sdpa",
    cache: BlockMaskCache | None = BLOCK_MASK_CACHE,
) -> ModelInputs:
    """Model inputs of a plain causal (AR) forward on x_0 alone: positions 0..L-1 (per document)."""
    _check_batch("x0", x0)
    batch, length = x0.shape
    device = x0.device
    backend = _resolve_backend(backend, device)
    if doc_ids is not None:
        doc_ids = doc_ids.to(device).long()
        if doc_ids.dim() == 1:
            doc_ids = doc_ids.expand(batch, length)
        position_ids = document_positions(doc_ids)
    else:
        position_ids = torch.arange(length, device=device).expand(batch, length)
    if backend == "sdpa":
        mask = AttentionMask.dense(_causal_allowed(length, doc_ids, device))
    else:
        mask_batch = None if doc_ids is None else batch

        def build() -> Any:
            return build_block_mask(_causal_mask_mod(doc_ids), mask_batch, length, length, device)

        key = ("causal", length, BlockMaskCache.layout_key(doc_ids), mask_batch, str(device))
        mask = AttentionMask.flex(cache.get(key, build) if cache is not None else build())
    return ModelInputs(x0, position_ids, mask)


def prefix_block_model_inputs(prefix_ids: torch.Tensor, block_ids: torch.Tensor) -> ModelInputs:
    """Inputs of one recompute (no KV cache) inference forward over [committed prefix ; active block].

    The prefix is causal (as its KV cache would be), the block sees the whole prefix and itself
    bidirectionally (`method.masks.inference_mask`); positions run 0..P+n-1.
    """
    _check_batch("block_ids", block_ids)
    batch = block_ids.shape[0]
    if prefix_ids is None:
        prefix_ids = block_ids[:, :0]
    _check_batch("prefix_ids", prefix_ids)
    prefix_len, block_len = prefix_ids.shape[1], block_ids.shape[1]
    device = block_ids.device
    input_ids = torch.cat([prefix_ids, block_ids], dim=1)
    position_ids = torch.arange(prefix_len + block_len, device=device).expand(batch, -1)
    mask = AttentionMask.dense(prefix_block_mask(prefix_len, block_len).to(device))
    return ModelInputs(input_ids, position_ids, mask)


# ------------------------------------------------------------------------------- forwards
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while not isinstance(model, NBDiffGPTModel) and hasattr(model, "module"):
        model = model.module
    return model


def _default_backend(model: torch.nn.Module, backend: str | None) -> str | None:
    if backend is not None:
        return backend
    cfg = getattr(_unwrap(model), "nbdiff_config", None)
    return cfg.resolved_attention_backend() if cfg is not None else None


def nbdiff_forward(
    model: torch.nn.Module,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    *,
    block_size: int,
    kind: str = "context_causal",
    doc_ids: torch.Tensor | None = None,
    backend: str | None = None,
    return_hidden: bool = False,
    cp_layout: ContextParallelLayout | None = None,
) -> torch.Tensor:
    """Logits [b, 2L, V] of the x_t ⊕ x_0 forward (hidden states [b, 2L, h] with return_hidden).

    Single-stage convenience; under pipeline parallelism call the model with `nbdiff_model_inputs`.
    Under context parallelism pass `cp_layout` (e.g. `ContextParallelLayout.current(L)`): the result
    is this rank's `[b, 2L/cp, ...]` rows (`context_parallel.gather_cp_sequence` gathers them).
    """
    inputs = nbdiff_model_inputs(
        x_t,
        x0,
        block_size=block_size,
        kind=kind,
        doc_ids=doc_ids,
        backend=_default_backend(model, backend),
        cp_layout=cp_layout,
    )
    return model(*inputs, return_hidden=return_hidden)


def ar_forward(
    model: torch.nn.Module,
    x0: torch.Tensor,
    *,
    doc_ids: torch.Tensor | None = None,
    backend: str | None = None,
    return_hidden: bool = False,
) -> torch.Tensor:
    """Logits [b, L, V] of a plain causal forward on x_0 (the AR baseline, conversion checks)."""
    inputs = ar_model_inputs(x0, doc_ids=doc_ids, backend=_default_backend(model, backend))
    return model(*inputs, return_hidden=return_hidden)


def prefix_block_forward(
    model: torch.nn.Module, prefix_ids: torch.Tensor, block_ids: torch.Tensor
) -> torch.Tensor:
    """Logits [b, n, V] of the active block given the committed prefix (recompute, no KV cache)."""
    inputs = prefix_block_model_inputs(prefix_ids, block_ids)
    logits = model(*inputs)
    return logits[:, prefix_ids.shape[1] if prefix_ids is not None else 0 :]
