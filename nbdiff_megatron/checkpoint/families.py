"""Supported HF model families: config mapping and the declarative tensor table of each.

A family says which HF `config.json` it accepts (`model_type` / `architectures`), how the HF config maps
onto `ModelConfig` (with every unsupported option rejected by name), and which HF tensors make which
megatron-core tensor through which named transform (`transforms.py`). `{i}` in a name is the decoder
layer index.

openPangu-Embedded (`PanguEmbeddedForCausalLM`, model_type `PanguEmbedded` / `openpangu_dense`) is
accepted when its config maps onto the Llama layout: SiLU gated MLP without bias, RMSNorm, plain or
Llama-3 / linear RoPE, no sliding window. Its `bias` option puts a bias on q/k/v (kept: megatron's
`add_qkv_bias`) and on o_proj, which megatron-core's layer has no place for: an o_proj bias is
accepted only when it is exactly zero (checked tensor by tensor) and is then dropped; anything else
is a ConversionError. Such a model exports back as a Qwen2 (q/k/v bias) or Llama model, which plain
`transformers` loads without remote code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nbdiff_megatron.errors import ConversionError
from nbdiff_megatron.model.config import ModelConfig

# megatron-core's RotaryEmbedding hard-codes these Llama-3 scaling constants (rotary_pos_embedding.py).
LLAMA3_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass(frozen=True)
class TensorRule:
    """One megatron-core tensor and the HF tensors it is made of."""

    mcore: str | None
    """megatron-core state-dict name (`{i}` = layer); None for HF tensors that are checked, then dropped."""
    hf: tuple[str, ...]
    """HF tensor names, in the order the transform takes them."""
    transform: str = "copy"
    """Name of the transform: copy, qkv, gated_mlp, vocab, zero_dropped."""
    when: str | None = None
    """Condition on the ModelConfig: qkv_bias, qk_norm, untied, dropped_o_bias (None = always)."""

    @property
    def per_layer(self) -> bool:
        """Whether the rule is instantiated once per decoder layer."""
        return any("{i}" in name for name in self.hf)


_L = "model.layers.{i}."
_M = "decoder.layers.{i}."

LLAMA_RULES: tuple[TensorRule, ...] = (
    TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    TensorRule(_M + "input_layernorm.weight", (_L + "input_layernorm.weight",)),
    TensorRule(
        _M + "self_attention.linear_qkv.weight",
        (
            _L + "self_attn.q_proj.weight",
            _L + "self_attn.k_proj.weight",
            _L + "self_attn.v_proj.weight",
        ),
        "qkv",
    ),
    TensorRule(_M + "self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",)),
    TensorRule(_M + "pre_mlp_layernorm.weight", (_L + "post_attention_layernorm.weight",)),
    TensorRule(
        _M + "mlp.linear_fc1.weight",
        (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
        "gated_mlp",
    ),
    TensorRule(_M + "mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",)),
    TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    TensorRule("output_layer.weight", ("lm_head.weight",), "vocab", when="untied"),
)
QKV_BIAS_RULE = TensorRule(
    _M + "self_attention.linear_qkv.bias",
    (_L + "self_attn.q_proj.bias", _L + "self_attn.k_proj.bias", _L + "self_attn.v_proj.bias"),
    "qkv",
    when="qkv_bias",
)
QK_NORM_RULES = (
    TensorRule(
        _M + "self_attention.q_layernorm.weight", (_L + "self_attn.q_norm.weight",), when="qk_norm"
    ),
    TensorRule(
        _M + "self_attention.k_layernorm.weight", (_L + "self_attn.k_norm.weight",), when="qk_norm"
    ),
)
ZERO_O_BIAS_RULE = TensorRule(
    None, (_L + "self_attn.o_proj.bias",), "zero_dropped", when="dropped_o_bias"
)

# HF tensors that are derived buffers, not weights (old Llama checkpoints saved RoPE's inv_freq).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Family:
    """One supported HF model family."""

    name: str
    """Short name used in metadata and messages."""
    model_types: tuple[str, ...]
    """HF `model_type` values this family accepts."""
    architectures: tuple[str, ...]
    """HF `architectures` entries this family accepts."""
    rules: tuple[TensorRule, ...]
    """The tensor table."""
    qkv_bias: str
    """"never", "always" (Qwen2) or "config" (openPangu's `bias`)."""
    qk_norm: bool
    """Whether the family normalises queries and keys per head (Qwen3)."""


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", ("llama",), ("LlamaForCausalLM",), LLAMA_RULES, "never", False),
    "qwen2": Family(
        "qwen2", ("qwen2",), ("Qwen2ForCausalLM",), LLAMA_RULES + (QKV_BIAS_RULE,), "always", False
    ),
    "qwen3": Family(
        "qwen3", ("qwen3",), ("Qwen3ForCausalLM",), LLAMA_RULES + QK_NORM_RULES, "never", True
    ),
    "openpangu": Family(
        "openpangu",
        ("PanguEmbedded", "openpangu_dense", "pangu_embedded"),
        ("PanguEmbeddedForCausalLM",),
        LLAMA_RULES + (QKV_BIAS_RULE, ZERO_O_BIAS_RULE),
        "config",
        False,
    ),
}

# What an exported model is written as: transformers' own classes, no remote code.
EXPORT_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def supported_list() -> str:
    """Human-readable list of the supported architectures (for error messages)."""
    return ", ".join(
        f"{arch} (model_type {fam.model_types[0]})"
        for fam in FAMILIES.values()
        for arch in fam.architectures
    )


def detect_family(hf_config: dict[str, Any], source: str = "config.json") -> Family:
    """The family of an HF config, or ConversionError listing the supported ones."""
    model_type = hf_config.get("model_type")
    architectures = tuple(hf_config.get("architectures") or ())
    for family in FAMILIES.values():
        if model_type in family.model_types or any(
            a in family.architectures for a in architectures
        ):
            return family
    raise ConversionError(
        f"{source}: unsupported architecture (model_type={model_type!r}, architectures="
        f"{list(architectures)}); supported: {supported_list()}"
    )


def rule_applies(rule: TensorRule, cfg: ModelConfig, dropped_o_bias: bool = False) -> bool:
    """Whether `rule` is part of the table for this model."""
    if rule.when is None:
        return True
    return {
        "qkv_bias": cfg.add_qkv_bias,
        "qk_norm": cfg.qk_layernorm,
        "untied": not cfg.tie_embeddings,
        "dropped_o_bias": dropped_o_bias,
    }[rule.when]


# ------------------------------------------------------------------------------------- config
def _rope(hf_config: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(theta, ModelConfig.rope_scaling) from either transformers 4.x or 5.x config fields."""
    params = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    partial = hf_config.get("partial_rotary_factor", merged.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConversionError(
            f"{source}: partial_rotary_factor={partial} is unsupported (need 1.0)"
        )
    if kind in (None, "default"):
        return float(theta), None
    if kind == "linear":
        return float(theta), {"type": "linear", "factor": float(merged["factor"])}
    if kind == "llama3":
        for key, fixed in LLAMA3_FIXED.items():
            if key in merged and float(merged[key]) != fixed:
                raise ConversionError(
                    f"{source}: rope {key}={merged[key]} is unsupported; megatron-core's Llama-3 "
                    f"RoPE scaling fixes it to {fixed}"
                )
        return float(theta), {
            "type": "llama3",
            "factor": float(merged["factor"]),
            **{k: merged.get(k, v) for k, v in LLAMA3_FIXED.items()},
        }
    raise ConversionError(
        f"{source}: rope type {kind!r} is unsupported; supported: default, linear, llama3"
    )


def _reject(source: str, field: str, value: Any, allowed: str) -> None:
    raise ConversionError(f"{source}: {field}={value!r} is unsupported ({allowed})")


def model_config_from_hf(
    hf_config: dict[str, Any],
    family: Family,
    *,
    vocab_size: int,
    seq_length: int | None = None,
    source: str = "config.json",
) -> tuple[ModelConfig, bool]:
    """Map an HF config onto ModelConfig; returns (config, o_proj bias present and to be dropped).

    `vocab_size` is the real vocabulary, [MASK] included (>= the HF vocab_size).
    """
    act = hf_config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        _reject(source, "hidden_act", act, "the gated MLP must use silu")
    if hf_config.get("mlp_bias"):
        _reject(source, "mlp_bias", True, "megatron-core's MLP here has no bias")
    if hf_config.get("use_sliding_window"):
        _reject(source, "use_sliding_window", True, "sliding-window attention is not implemented")
    layer_types = hf_config.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        _reject(source, "layer_types", sorted(set(layer_types)), "only full_attention layers")
    attention_bias = bool(hf_config.get("attention_bias", False))
    dropped_o_bias = False
    if family.qkv_bias == "always":
        qkv_bias = True
    elif family.qkv_bias == "config":
        qkv_bias = bool(hf_config.get("bias", attention_bias))
        dropped_o_bias = qkv_bias
    else:
        if attention_bias:
            _reject(
                source,
                "attention_bias",
                True,
                f"{family.name} with o_proj bias has no megatron-core equivalent",
            )
        qkv_bias = False
    try:
        hidden = int(hf_config["hidden_size"])
        heads = int(hf_config["num_attention_heads"])
        layers = int(hf_config["num_hidden_layers"])
        ffn = int(hf_config["intermediate_size"])
    except KeyError as exc:
        raise ConversionError(f"{source}: required field {exc.args[0]!r} is missing") from None
    groups = int(hf_config.get("num_key_value_heads") or heads)
    head_dim = hf_config.get("head_dim")
    theta, rope_scaling = _rope(hf_config, source)
    max_positions = int(hf_config.get("max_position_embeddings") or 4096)
    cfg = ModelConfig(
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=groups if groups != heads else None,
        kv_channels=int(head_dim) if head_dim and int(head_dim) != hidden // heads else None,
        vocab_size=int(vocab_size),
        seq_length=int(seq_length or min(max_positions, 4096)),
        rotary_base=theta,
        rope_scaling=rope_scaling,
        norm_epsilon=float(hf_config.get("rms_norm_eps", 1e-6)),
        qk_layernorm=family.qk_norm,
        add_qkv_bias=qkv_bias,
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        init_method_std=float(hf_config.get("initializer_range", 0.02)),
    )
    try:
        cfg.validate()
    except Exception as exc:  # ConfigError names a ModelConfig field; say where it came from
        raise ConversionError(f"{source} maps onto an invalid model: {exc}") from exc
    return cfg, dropped_o_bias


def export_family(cfg: ModelConfig) -> str:
    """The transformers family an NBDiff model is exported as (qwen3, qwen2 or llama)."""
    if cfg.qk_layernorm:
        if cfg.add_qkv_bias:
            raise ConversionError(
                "a model with both QK-norm and a q/k/v bias has no transformers class to export to "
                "(Qwen3's attention_bias also adds an o_proj bias)"
            )
        return "qwen3"
    if cfg.add_qkv_bias:
        return "qwen2"
    return "llama"


def hf_config_for_export(
    cfg: ModelConfig,
    family: str,
    *,
    source_hf_config: dict[str, Any] | None,
    dtype: str,
    extra: dict[str, Any] | None = None,
    context_length: int | None = None,
):
    """A transformers config object describing `cfg` as a `family` model (what save_pretrained writes).

    `context_length`: max_position_embeddings to record (a trained checkpoint's seq_length); None
    keeps the source config's value."""
    import transformers  # lazy: seconds at import; only the export writes a config object

    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[family]
    carried: dict[str, Any] = {}
    for key in (
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "max_position_embeddings",
        "initializer_range",
    ):
        if source_hf_config and source_hf_config.get(key) is not None:
            carried[key] = source_hf_config[key]
    if context_length is not None:
        carried["max_position_embeddings"] = int(context_length)
    carried.setdefault("max_position_embeddings", max(cfg.seq_length, 2048))
    rope_scaling = None
    if cfg.rope_scaling is not None:
        rope_scaling = dict(cfg.rope_scaling)
        rope_scaling["rope_type"] = rope_scaling.pop("type", rope_scaling.get("rope_type"))
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        rms_norm_eps=cfg.norm_epsilon,
        rope_theta=cfg.rotary_base,
        rope_scaling=rope_scaling,
        tie_word_embeddings=cfg.tie_embeddings,
        **carried,
    )
    if family in ("llama", "qwen3"):
        kwargs["attention_bias"] = False
    if family == "llama":
        kwargs["mlp_bias"] = False
    if rope_scaling is not None and rope_scaling["rope_type"] == "llama3":
        kwargs["max_position_embeddings"] = max(
            kwargs["max_position_embeddings"],
            int(rope_scaling.get("original_max_position_embeddings", 8192)) + 1,
        )
    config = cls(**kwargs, **(extra or {}))
    config.architectures = [EXPORT_ARCHITECTURES[family]]
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    if hasattr(config, "dtype"):
        config.dtype = torch_dtype
    else:  # transformers 4.x
        config.torch_dtype = torch_dtype
    return config
