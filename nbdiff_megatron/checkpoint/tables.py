"""Instantiating a family's tensor table for one model: names, expected shapes, transforms.

`table_for(family, cfg)` expands the `{i}` rules into concrete `BoundRule`s grouped by unit (the global
tensors first, then one unit per decoder layer), which is the granularity both directions stream at.
`to_mcore` / `to_hf` apply a rule's named transform forward / backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nbdiff_megatron.checkpoint import transforms as T
from nbdiff_megatron.checkpoint.families import Family, rule_applies
from nbdiff_megatron.errors import ConversionError
from nbdiff_megatron.model.config import ModelConfig


@dataclass(frozen=True)
class BoundRule:
    """A rule with its layer index filled in."""

    mcore: str | None
    """megatron-core state-dict name (None: checked then dropped)."""
    hf: tuple[str, ...]
    """HF tensor names."""
    transform: str
    """Transform name."""


@dataclass(frozen=True)
class VocabSizes:
    """The three sizes of the vocabulary tables."""

    hf: int
    """Rows of the HF tables (HF config vocab_size)."""
    real: int
    """Real vocabulary, [MASK] included (ModelConfig.vocab_size)."""
    padded: int
    """Rows megatron-core allocates for the intended TP size."""


def table_for(
    family: Family, cfg: ModelConfig, *, dropped_o_bias: bool = False
) -> list[list[BoundRule]]:
    """Units of bound rules: [global rules, layer 0 rules, layer 1 rules, ...]."""
    applicable = [r for r in family.rules if rule_applies(r, cfg, dropped_o_bias)]
    units = [[BoundRule(r.mcore, r.hf, r.transform) for r in applicable if not r.per_layer]]
    for i in range(cfg.num_layers):
        units.append(
            [
                BoundRule(
                    r.mcore.format(i=i) if r.mcore else None,
                    tuple(n.format(i=i) for n in r.hf),
                    r.transform,
                )
                for r in applicable
                if r.per_layer
            ]
        )
    return units


def expected_hf_shape(name: str, cfg: ModelConfig, hf_vocab: int) -> tuple[int, ...]:
    """The shape an HF tensor must have for this model."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.query_groups * hd
    suffixes = {
        "embed_tokens.weight": (hf_vocab, h),
        "lm_head.weight": (hf_vocab, h),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "model.norm.weight": (h,),
        "q_proj.weight": (q_out, h),
        "k_proj.weight": (kv_out, h),
        "v_proj.weight": (kv_out, h),
        "q_proj.bias": (q_out,),
        "k_proj.bias": (kv_out,),
        "v_proj.bias": (kv_out,),
        "o_proj.weight": (h, q_out),
        "o_proj.bias": (h,),
        "q_norm.weight": (hd,),
        "k_norm.weight": (hd,),
        "gate_proj.weight": (cfg.ffn_hidden_size, h),
        "up_proj.weight": (cfg.ffn_hidden_size, h),
        "down_proj.weight": (h, cfg.ffn_hidden_size),
    }
    for suffix, shape in suffixes.items():
        if name.endswith(suffix):
            return shape
    raise ConversionError(f"internal: no expected shape for HF tensor {name}")


def attention_shape(cfg: ModelConfig) -> T.AttentionShape:
    """The QKV transforms' view of the config."""
    return T.AttentionShape(cfg.num_attention_heads, cfg.query_groups, cfg.head_dim)


def to_mcore(
    rule: BoundRule, tensors: list[torch.Tensor], cfg: ModelConfig, vocab: VocabSizes
) -> torch.Tensor | None:
    """Apply a rule forward (HF tensors -> the megatron-core tensor)."""
    kind = rule.transform
    if kind == "copy":
        return tensors[0]
    if kind == "qkv":
        return T.qkv_interleave(*tensors, attention_shape(cfg))
    if kind == "gated_mlp":
        return T.gated_mlp_concat(*tensors)
    if kind == "vocab":
        return T.pad_vocab(T.add_mask_rows(tensors[0], vocab.real), vocab.padded)
    if kind == "zero_dropped":
        if torch.count_nonzero(tensors[0]).item():
            raise ConversionError(
                f"{rule.hf[0]} is not zero: megatron-core's attention has no output-projection bias, "
                "so this checkpoint cannot be converted exactly"
            )
        return None
    raise ConversionError(f"internal: unknown transform {kind!r}")


def to_hf(rule: BoundRule, tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """Apply a rule backward (the megatron-core tensor -> HF tensors, in rule.hf order)."""
    kind = rule.transform
    if kind == "copy":
        return [tensor.contiguous()]
    if kind == "qkv":
        return list(T.qkv_split(tensor, attention_shape(cfg)))
    if kind == "gated_mlp":
        return list(T.gated_mlp_split(tensor))
    if kind == "vocab":
        return [T.unpad_vocab(tensor, cfg.vocab_size)]
    raise ConversionError(f"internal: transform {kind!r} has no inverse")
