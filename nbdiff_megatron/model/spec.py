"""nbdiff_layer_spec(): megatron-core's GPT layer spec with NBDiffAttention as the core attention.

Everything but the core attention stays megatron-core's (RMSNorm, fused QKV with GQA, optional QK-norm,
SwiGLU MLP): only `submodules.self_attention.submodules.core_attention` is swapped. With Transformer Engine
importable the TE linear/norm layers are used, else megatron-core's local ones (the CPU path); in the
local spec the row-parallel linears (attention output, MLP fc2) are `RowParallelLinearWithGroup`, which
hands its own TP group to the matmul that megatron-core's `RowParallelLinear` calls without one.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from nbdiff_megatron.model.attention import NBDiffAttention

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
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine is None:
        use_transformer_engine = HAVE_TE
    if use_transformer_engine:
        if not HAVE_TE:
            raise ImportError(
                "use_transformer_engine=True but transformer_engine is not importable"
            )
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    else:
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
