"""nbdiff_layer_spec(): megatron-core's GPT layer spec with NBDiffAttention as the core attention.

Everything but the core attention stays megatron-core's (RMSNorm, fused QKV with GQA, optional QK-norm,
SwiGLU MLP): only `submodules.self_attention.submodules.core_attention` is swapped. With Transformer Engine
importable the TE linear/norm layers are used, else megatron-core's local ones (the CPU path).
"""

from __future__ import annotations

import copy

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from nbdiff_megatron.model.attention import NBDiffAttention

try:  # the one guarded Transformer Engine import of the model package
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except Exception:  # ImportError, or a broken CUDA install raising at import
    HAVE_TE = False


def nbdiff_layer_spec(*, qk_layernorm: bool = False, use_transformer_engine: bool | None = None,
                      normalization: str = "RMSNorm") -> ModuleSpec:
    """The transformer-layer ModuleSpec of the NBDiff model.

    Args:
        qk_layernorm: RMSNorm on queries and keys per head (Qwen3).
        use_transformer_engine: None = TE when importable; True demands TE (raises without it).
        normalization: "RMSNorm" (Llama/Qwen) or "LayerNorm".
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine is None:
        use_transformer_engine = HAVE_TE
    if use_transformer_engine:
        if not HAVE_TE:
            raise ImportError("use_transformer_engine=True but transformer_engine is not importable")
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=qk_layernorm,
                                                        normalization=normalization)
    spec = copy.deepcopy(spec)
    attention = spec.submodules.self_attention
    # Masks are arbitrary (x_t ⊕ x_0, packed documents, prefix + block): never megatron's causal shortcut.
    attention.params = {**(attention.params or {}), "attn_mask_type": AttnMaskType.arbitrary}
    attention.submodules.core_attention = NBDiffAttention
    return spec
