"""nbdiff_layer_spec(): megatron-core's GPT layer spec with NBDiffAttention as the core attention.

Everything but the core attention stays megatron-core's (RMSNorm, fused QKV with GQA, optional QK-norm,
SwiGLU MLP): only `submodules.self_attention.submodules.core_attention` is swapped. `model.transformer_impl`
picks the linear/norm layers (`use_transformer_engine`): Transformer Engine's, or megatron-core's local
ones (the CPU path, and a GPU without TE); `auto` = TE when it imports. In the local spec the
row-parallel linears (attention output, MLP fc2) are `RowParallelLinearWithGroup`, which hands its own
TP group to the matmul that megatron-core's `RowParallelLinear` calls without one.

`nbdiff_block_spec` gives the decoder block with its final norm chosen by the same implementation:
megatron-core picks the block's final norm by what is importable (TE's, else apex's FusedLayerNorm,
which has no RMSNorm, else torch's), whatever the layers' spec says.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from nbdiff_megatron.errors import ConfigError
from nbdiff_megatron.megatron_compat import patch_local_torch_norm
from nbdiff_megatron.model.attention import NBDiffAttention
from nbdiff_megatron.model.config import TRANSFORMER_IMPLS

try:  # the one guarded Transformer Engine import of the model package
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except Exception:  # ImportError, or a broken CUDA install raising at import
    HAVE_TE = False


class RowParallelLinearWithGroup(RowParallelLinear):
    """megatron-core's RowParallelLinear, passing its own TP group to the matmul it runs.

    `RowParallelLinear.forward` calls `_forward_impl(..., tp_group=None)` (0.16.1 and 0.19.2), and
    the matmul (`linear_with_grad_accumulation_and_async_allreduce` / `linear_with_frozen_weight`)
    then warns "tp_group is None ... Passing tp_group will be mandatory soon" (on rank 0) on every
    forward of every layer. The group is the one the layer was built with (`self.tp_group`, from the model's
    pg_collection). Numerics are unchanged: the row-parallel matmul runs with
    sequence_parallel=False and allreduce_dgrad=False, so it never communicates over the group (the
    layer reduces its output over `self.tp_group` itself, after the matmul).
    """

    def _forward_impl(self, input: Any, weight: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("tp_group", False) is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


def _replace_module(node: Any, old: type, new: type) -> Any:
    """`node` (a spec, a submodules dataclass, a partial of one, a class) with `old` swapped for `new`
    wherever the tree names it; 0.16.1 nests the MLP as a ModuleSpec, 0.19.2 as a partial."""
    if node is old:
        return new
    if isinstance(node, ModuleSpec):
        node.submodules = _replace_module(node.submodules, old, new)
        return node
    if isinstance(node, functools.partial):
        args = [_replace_module(a, old, new) for a in node.args]
        keywords = {k: _replace_module(v, old, new) for k, v in node.keywords.items()}
        return functools.partial(node.func, *args, **keywords)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {
            f.name: _replace_module(getattr(node, f.name), old, new)
            for f in dataclasses.fields(node)
            if f.init
        }
        return dataclasses.replace(node, **changes)
    return node


def uses_transformer_engine(transformer_impl: str) -> bool:
    """Whether `model.transformer_impl` builds Transformer Engine layers on this machine."""
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ConfigError(
            f"model.transformer_impl={transformer_impl!r} is unknown: use one of "
            f"{', '.join(TRANSFORMER_IMPLS)}"
        )
    if transformer_impl == "transformer_engine" and not HAVE_TE:
        raise ConfigError(
            "model.transformer_impl=transformer_engine but transformer_engine does not import "
            "here: install it (NGC PyTorch containers ship it) or set --model.transformer_impl="
            "local (or auto)"
        )
    return transformer_impl == "transformer_engine" or (transformer_impl == "auto" and HAVE_TE)


def nbdiff_layer_spec(
    *,
    qk_layernorm: bool = False,
    use_transformer_engine: bool | None = None,
    normalization: str = "RMSNorm",
) -> ModuleSpec:
    """The transformer-layer ModuleSpec of the NBDiff model.

    Args:
        qk_layernorm: RMSNorm on queries and keys per head (Qwen3).
        use_transformer_engine: None = TE when importable; True demands TE (raises without it).
        normalization: "RMSNorm" (Llama/Qwen) or "LayerNorm".
    """
    if use_transformer_engine is None:
        use_transformer_engine = HAVE_TE
    if use_transformer_engine:
        uses_transformer_engine("transformer_engine")  # raises without TE
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    else:
        # The local norms are torch's on every device: they need the patch that lets them carry
        # sequence parallelism and the training dtype (a GPU without TE included).
        patch_local_torch_norm()
        spec = gpt_layer_specs.get_gpt_layer_local_spec(
            qk_layernorm=qk_layernorm, normalization=normalization
        )
    spec = copy.deepcopy(spec)
    attention = spec.submodules.self_attention
    # Masks are arbitrary (x_t ⊕ x_0, packed documents, prefix + block): never megatron's causal shortcut.
    attention.params = {**(attention.params or {}), "attn_mask_type": AttnMaskType.arbitrary}
    attention.submodules.core_attention = NBDiffAttention
    # The local linears only (TE's row-parallel linear is another class and gets its group from
    # megatron-core's layer construction).
    return _replace_module(spec, RowParallelLinear, RowParallelLinearWithGroup)


def final_norm_impl(use_transformer_engine: bool) -> type:
    """The decoder's final norm: TE's norm with TE layers, torch's (sequence-parallel capable
    through the patch above) with the local ones -- never apex's FusedLayerNorm, which has no
    RMSNorm and which megatron-core would pick whenever apex imports."""
    if use_transformer_engine:
        # optional: megatron-core's Transformer Engine extension, needed with TE layers only
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    patch_local_torch_norm()
    return WrappedTorchNorm


def nbdiff_block_spec(
    config: Any,
    layer_spec: ModuleSpec,
    *,
    use_transformer_engine: bool,
    vp_stage: int | None = None,
) -> TransformerBlockSubmodules:
    """This pipeline stage's decoder block: its layers' spec and the final norm of the same
    implementation (`final_norm_impl`)."""
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec] * count, layer_norm=final_norm_impl(use_transformer_engine)
    )
