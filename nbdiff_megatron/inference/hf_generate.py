"""Block-diffusion decoding of an exported HF folder, with transformers and torch only.

`nbdiff convert mcore-to-hf` writes this file as `custom_generate/generate.py` of the exported folder,
with the package imports below replaced by the source of `unmasking.py` and `refinement.py` (the
refinement loop `nbdiff generate` runs), so that

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    out = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=64)

block-decodes without this package (transformers' `custom_generate` mechanism replaces `generate`
when the folder is loaded with `trust_remote_code=True`; without it, `generate` stays the plain AR
one). It runs the same loop, input checks and stop reasons as `BlockDecoder` (decoder.py) through an
`HFRunner`, with the prefix recomputed at every forward (no KV cache): it gives the tokens
`nbdiff generate` gives, trading speed for having no dependency.

Defaults come from the folder: `config.nbdiff` (block_size, token_shift, mask_kind, block_align,
mask_token_id), `generation_config` (eos / pad ids, max_new_tokens) and `max_position_embeddings`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

# --- package imports: replaced by the source of unmasking.py and refinement.py when exported ---
from nbdiff_megatron.inference.refinement import (
    DecodeConfig,
    DecodeStats,
    capped_budgets,
    decode_batch,
    unmasking_config,
)
from nbdiff_megatron.inference.unmasking import SamplingConfig

# --- end of package imports ---


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


class HFRunner:
    """The refinement loop's runner over a transformers causal LM: one forward of the whole sequence
    with a dense additive mask built from the loop's `allowed` (True = may attend); no KV cache."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.forward_passes = 0

    @property
    def device(self) -> torch.device:
        """Device of the model's weights."""
        return next(self.model.parameters()).device

    def new_cache(self, capacity: int) -> Any:
        raise ValueError(
            "the exported decoder recomputes the prefix (DecodeConfig.use_cache=False)"
        )

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        allowed: torch.Tensor,
        *,
        cache: Any = None,
        commit: bool = False,
        commit_columns: int = 0,
    ) -> torch.Tensor:
        """Logits `[b, n, V]` (fp32) of `tokens` `[b, n]` at `positions` under `allowed` `[b, n, n]`."""
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=tokens.device)
        mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
        self.forward_passes += 1
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions)
        return out.logits.float()


@dataclass
class BlockGenerateOutput:
    """What `generate(..., return_dict_in_generate=True)` returns."""

    sequences: torch.Tensor
    """[b, P + n]: the inputs and the generated tokens (as `generate` returns them)."""
    stop_reasons: list[str]
    """Per row: "eos", "length" (max_new_tokens), "context" (the model's context is full), as
    `nbdiff generate` reports them."""
    stats: DecodeStats
    """NFE, tokens per forward, tokens/s, fused commits."""


def decode_config(model: Any, gen_cfg: Any, options: dict[str, Any]) -> DecodeConfig:
    """DecodeConfig of `generate`'s options, defaulting to the exported folder's settings."""
    nb = dict(getattr(model.config, "nbdiff", None) or {})
    max_new = options["max_new_tokens"]
    if max_new is None:
        max_new = int(getattr(gen_cfg, "max_new_tokens", None) or 256)
    shift = options["token_shift"]
    return DecodeConfig(
        block_size=int(options["block_size"] or nb.get("block_size") or 32),
        sub_block_size=options["sub_block_size"],
        max_new_tokens=int(max_new),
        token_shift=nb.get("token_shift", True) if shift is None else bool(shift),
        unmasking=unmasking_config(
            options["unmasking"],
            options["threshold"],
            options["tokens_per_step"],
            options["steps_per_block"],
        ),
        sampling=SamplingConfig(options["temperature"], options["top_p"], options["top_k"]),
        use_cache=False,
        seed=options["seed"],
        mask_kind=options["mask_kind"] or nb.get("mask_kind") or "context_causal",
        block_align=options["block_align"] or nb.get("block_align") or "document",
        fused_commit=bool(options["fused_commit"]),
    )


@torch.no_grad()
def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    generation_config: Any = None,
    *,
    max_new_tokens: int | None = None,
    block_size: int | None = None,
    sub_block_size: int | None = None,
    token_shift: bool | None = None,
    mask_kind: str | None = None,
    block_align: str | None = None,
    unmasking: str | None = None,
    threshold: float | None = None,
    tokens_per_step: int = 1,
    steps_per_block: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    row_ids: list[int] | None = None,
    fused_commit: bool = True,
    return_dict_in_generate: bool | None = None,
    **unused: Any,
) -> torch.Tensor | BlockGenerateOutput:
    """Block-decode `input_ids` ([b, P], left-padded, `attention_mask` 1 on real tokens).

    Returns `[b, P + n]`: the inputs followed by each row's generated tokens (the EOS that stopped a
    row included), right-padded with the pad id; with `return_dict_in_generate=True`, a
    BlockGenerateOutput that also holds each row's stop reason and the decoding statistics. Options
    are those of `nbdiff generate`; `max_new_tokens` beyond the context is capped, with a warning.
    """
    options = dict(locals())  # the keyword options above, by name, for decode_config
    gen_cfg = generation_config or getattr(model, "generation_config", None)
    config = decode_config(model, gen_cfg, options)
    nb = dict(getattr(model.config, "nbdiff", None) or {})
    mask_id = int(nb.get("mask_token_id", getattr(model.config, "mask_token_id", 0)))
    eos_ids = _ids(getattr(gen_cfg, "eos_token_id", None))
    pad_id = getattr(gen_cfg, "pad_token_id", None)
    pad_id = int(pad_id if pad_id is not None else (eos_ids[0] if eos_ids else mask_id))
    max_context = int(model.config.max_position_embeddings)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]
    capped = capped_budgets(prompts, config.max_new_tokens, max_context)
    if capped:
        warnings.warn(
            f"max_new_tokens={config.max_new_tokens} does not fit in the context "
            f"({max_context} tokens): rows {sorted(capped)} can generate at most "
            f"{sorted(set(capped.values()))} tokens",
            stacklevel=2,
        )
    out = decode_batch(
        HFRunner(model),
        prompts,
        config,
        mask_id=mask_id,
        pad_id=pad_id,
        eos_ids=eos_ids,
        max_context=max_context,
        row_ids=row_ids,
    )
    rows = [t + ([e] if e is not None else []) for t, e in zip(out.tokens, out.eos_tokens)]
    new = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        new[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    sequences = torch.cat([input_ids, new.to(input_ids.device)], dim=1)
    if return_dict_in_generate is None:
        return_dict_in_generate = bool(getattr(gen_cfg, "return_dict_in_generate", False))
    if return_dict_in_generate:
        return BlockGenerateOutput(sequences, out.stop_reasons, out.stats)
    return sequences
