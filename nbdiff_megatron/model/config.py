"""Typed configuration of the NBDiff transformer (Qwen3/Llama-style GPT on megatron-core).

`ModelConfig` is what YAML configs and the HF converter fill in; `to_transformer_config()` turns it into
megatron-core's `TransformerConfig` for a given parallel layout. Field names are stable: the training config
and checkpoints refer to them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from nbdiff_megatron.errors import ConfigError
from nbdiff_megatron.megatron_compat import known_fields

ATTENTION_BACKENDS = ("auto", "sdpa", "flex")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
# params_dtype -> the name of its torch dtype (`ModelConfig.torch_dtype`).
PARAMS_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
ROPE_SCALING_TYPES = ("llama3", "linear")
RECOMPUTE_GRANULARITIES = (None, "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass
class ModelConfig:
    """Shape and numerics of the NBDiff transformer; the model runs on 2 * seq_length tokens."""

    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Width of the residual stream."""
    ffn_hidden_size: int = 256
    """Inner width of the SwiGLU MLP (per gate branch)."""
    num_attention_heads: int = 4
    """Number of query heads."""
    num_query_groups: int | None = None
    """Number of key/value heads (GQA); None means multi-head attention (= num_attention_heads)."""
    kv_channels: int | None = None
    """Head dimension; None means hidden_size // num_attention_heads."""
    vocab_size: int = 0
    """Real vocabulary size, [MASK] included (set from the tokenizer; 0 = not set yet)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding table is padded to a multiple of this times the TP size."""
    seq_length: int = 256
    """L, the length of x_0; the training forward runs on x_t ⊕ x_0, i.e. 2L tokens."""
    rotary_base: float = 10000.0
    """RoPE base (theta)."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE scaling: None, {"type": "llama3", "factor": F} or {"type": "linear", "factor": F}."""
    norm_epsilon: float = 1e-6
    """Epsilon of the RMSNorm layers."""
    qk_layernorm: bool = False
    """Apply RMSNorm to queries and keys per head (Qwen3)."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection (Qwen2); the other linears never have a bias."""
    tie_embeddings: bool = True
    """Share the input embedding and the output layer weights."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    attention_backend: str = "auto"
    """Core attention: "sdpa" (dense mask), "flex" (FlexAttention BlockMask) or "auto" (flex on CUDA)."""
    transformer_impl: str = "auto"
    """Linear and norm layers: "transformer_engine" (TE's fused layers; needs TE installed), "local"
    (megatron-core's own, the CPU path) or "auto" (TE when it imports). A checkpoint of either loads
    under the other (`training.checkpointing`: TE's `_extra_state` entries may be absent)."""
    params_dtype: str = "fp32"
    """Parameter and activation dtype: "fp32" or "bf16" (set from train.precision by the loop)."""
    hidden_dropout: float = 0.0
    """Dropout after the attention and MLP blocks."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities."""
    recompute_granularity: str | None = None
    """Activation recomputation (megatron-core's name): null (none), "selective" (the core attention
    is recomputed in backward) or "full" (whole layers, see recompute_method)."""
    recompute_method: str | None = None
    """With full recomputation: "uniform" (every layer, in groups of recompute_num_layers) or
    "block" (the first recompute_num_layers layers of each pipeline stage); null otherwise."""
    recompute_num_layers: int | None = None
    """With full recomputation: the group size (uniform) or the number of layers (block)."""
    extra_transformer_config: dict[str, Any] = field(default_factory=dict)
    """Expert escape hatch: extra keyword arguments passed to megatron-core's TransformerConfig."""

    # ------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        """Per-head dimension actually used."""
        if self.kv_channels is not None:
            return self.kv_channels
        return self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        """Number of key/value heads actually used."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        """torch dtype of `params_dtype`."""
        return getattr(torch, PARAMS_DTYPES[self.params_dtype])

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocabulary size of the embedding table: a multiple of make_vocab_size_divisible_by * tp."""
        multiple = self.make_vocab_size_divisible_by * tp
        return ((self.vocab_size + multiple - 1) // multiple) * multiple

    def resolved_attention_backend(self) -> str:
        """The backend used on this machine ("auto" -> flex with CUDA, sdpa otherwise)."""
        if self.attention_backend == "auto":
            return "flex" if torch.cuda.is_available() else "sdpa"
        return self.attention_backend

    # ------------------------------------------------------------------ validation
    def validate(
        self, tp: int = 1, pp: int = 1, cp: int = 1, block_size: int | None = None
    ) -> None:
        """Raise ConfigError naming the field and the fix when the config cannot build a model."""
        self._validate_shape()
        self._validate_layout(tp, pp, cp)
        self._validate_options()
        self._validate_recompute(pp)
        if block_size is not None:
            if block_size <= 0:
                raise ConfigError(f"block_size must be a positive integer, got {block_size}")
            if block_size > self.seq_length:
                raise ConfigError(
                    f"block_size={block_size} is larger than model.seq_length={self.seq_length}: "
                    "lower the (target) block size or raise model.seq_length"
                )

    def _validate_shape(self) -> None:
        """Sizes, vocabulary and heads."""

        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")

        for name in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "seq_length",
            "make_vocab_size_divisible_by",
        ):
            positive(name)
        if self.vocab_size <= 0:
            raise ConfigError(
                f"model.vocab_size is {self.vocab_size}: set it from the tokenizer (its size, [MASK] "
                "included) before building the model"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
                f"{self.num_attention_heads}: change one of them or set model.kv_channels"
            )
        if self.kv_channels is not None:
            positive("kv_channels")
        if self.head_dim % 2:
            raise ConfigError(f"model.kv_channels (head dim {self.head_dim}) must be even for RoPE")
        if self.num_query_groups is not None:
            positive("num_query_groups")
            if self.num_attention_heads % self.num_query_groups:
                raise ConfigError(
                    f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                    f"model.num_query_groups={self.num_query_groups}: pick a divisor"
                )

    def _validate_layout(self, tp: int, pp: int, cp: int) -> None:
        """The parallel sizes, and what each of them splits."""
        for name, value in (("tp", tp), ("pp", pp), ("cp", cp)):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"parallel size {name} must be a positive integer, got {value!r}")
        # Each parallel size must divide what it splits (hf_to_mcore cuts the message at ": change").
        for name, value, split, size in (
            ("num_attention_heads", self.num_attention_heads, "tensor", tp),
            ("num_query_groups", self.query_groups, "tensor", tp),
            ("ffn_hidden_size", self.ffn_hidden_size, "tensor", tp),
            ("num_layers", self.num_layers, "pipeline", pp),
        ):
            if value % size:
                raise ConfigError(
                    f"model.{name}={value} is not divisible by the {split} parallel size {size}: "
                    f"change model.{name} or the {split} parallel size"
                )
        if cp > 1 and self.seq_length % (2 * cp):
            raise ConfigError(
                f"model.seq_length={self.seq_length} must be divisible by 2 * the context parallel "
                f"size = {2 * cp}: each half (x_t, x_0) is cut into 2*cp chunks and CP rank r holds "
                f"chunks r and 2cp-1-r of both; change model.seq_length or the CP size"
            )

    def _validate_options(self) -> None:
        """Named choices, RoPE and dropout."""
        for name, choices in (
            ("attention_backend", ATTENTION_BACKENDS),
            ("transformer_impl", TRANSFORMER_IMPLS),
            ("params_dtype", PARAMS_DTYPES),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(
                    f"model.{name}={value!r} is unknown: use one of {', '.join(choices)}"
                )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ROPE_SCALING_TYPES:
                raise ConfigError(
                    f"model.rope_scaling type {kind!r} is unsupported: use one of "
                    f"{', '.join(ROPE_SCALING_TYPES)} or null"
                )
            factor = self.rope_scaling.get("factor")
            if not isinstance(factor, (int, float)) or factor <= 0:
                raise ConfigError(
                    f"model.rope_scaling.factor must be a positive number, got {factor!r}"
                )
        if self.rotary_base <= 0:
            raise ConfigError(f"model.rotary_base must be positive, got {self.rotary_base}")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {value}")

    def _validate_recompute(self, pp: int) -> None:
        granularity, method, count = (
            self.recompute_granularity,
            self.recompute_method,
            self.recompute_num_layers,
        )
        if granularity not in RECOMPUTE_GRANULARITIES:
            raise ConfigError(
                f"model.recompute_granularity={granularity!r} is unknown: use null, 'selective' or "
                "'full'"
            )
        if granularity != "full":
            if method is not None or count is not None:
                raise ConfigError(
                    "model.recompute_method / model.recompute_num_layers only apply to "
                    f"model.recompute_granularity='full' (it is {granularity!r}): remove them or "
                    "set recompute_granularity: full"
                )
            return
        if method not in RECOMPUTE_METHODS:
            raise ConfigError(
                f"model.recompute_method={method!r}: full recomputation needs 'uniform' or 'block'"
            )
        per_stage = self.num_layers // pp
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= per_stage:
            raise ConfigError(
                f"model.recompute_num_layers={count!r} must be an integer in [1, {per_stage}] (the "
                f"layers of one pipeline stage: {self.num_layers} / pp {pp})"
            )

    # ------------------------------------------------------------------ megatron-core
    def to_transformer_config(
        self,
        tp: int = 1,
        pp: int = 1,
        cp: int = 1,
        *,
        sequence_parallel: bool = False,
        **overrides: Any,
    ):
        """megatron-core TransformerConfig: RMSNorm, SwiGLU, no linear bias, CPU-safe settings on CPU."""
        # megatron-core on first use: `nbdiff plan` and config checks import this module without it
        from megatron.core.transformer.transformer_config import TransformerConfig

        self.validate(tp=tp, pp=pp, cp=cp)
        on_cuda = torch.cuda.is_available()
        dtype = self.torch_dtype
        kwargs: dict[str, Any] = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.query_groups,
            kv_channels=self.head_dim,
            layernorm_epsilon=self.norm_epsilon,
            normalization="RMSNorm",
            qk_layernorm=self.qk_layernorm,
            add_bias_linear=False,
            add_qkv_bias=self.add_qkv_bias,
            gated_linear_unit=True,
            activation_func=F.silu,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            init_method_std=self.init_method_std,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
            sequence_parallel=sequence_parallel and tp > 1,
            recompute_granularity=self.recompute_granularity,
            recompute_method=self.recompute_method,
            recompute_num_layers=self.recompute_num_layers,
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            # Fusions need apex / TE / CUDA kernels; the unfused paths are exact and portable.
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            use_cpu_initialization=not on_cuda,
            # p2p_communication calls torch.cuda.synchronize() when batch_p2p_sync is on.
            batch_p2p_sync=on_cuda,
        )
        # A field the installed megatron-core does not know is an error, never silently dropped.
        known_fields(
            TransformerConfig,
            self.extra_transformer_config,
            what="TransformerConfig",
            user_fields="model.extra_transformer_config",
        )
        kwargs.update(self.extra_transformer_config)
        kwargs.update(overrides)
        return TransformerConfig(
            **known_fields(TransformerConfig, kwargs, what="TransformerConfig")
        )

    def rope_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of megatron-core's RotaryEmbedding for this config."""
        kwargs: dict[str, Any] = {"rotary_base": self.rotary_base}
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind == "llama3":
                kwargs.update(
                    rope_scaling=True, rope_scaling_factor=float(self.rope_scaling["factor"])
                )
            elif kind == "linear":
                kwargs.update(seq_len_interpolation_factor=float(self.rope_scaling["factor"]))
        return kwargs

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a mapping (YAML section); unknown keys raise ConfigError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown model field(s) {', '.join(unknown)}: known fields are {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for YAML and checkpoints)."""
        return dataclasses.asdict(self)
