"""Block-diffusion decoding of an exported HF folder, with transformers and torch only.

`nbdiff convert mcore-to-hf` writes this file (with the unmasking rules of `unmasking.py` inlined where
the package import stands) as `custom_generate/generate.py` of the exported folder, so that

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    out = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=64)

block-decodes without this package (transformers' `custom_generate` mechanism replaces `generate`
when the folder is loaded with `trust_remote_code=True`; without it, `generate` stays the plain AR
one). It mirrors `BlockDecoder` (decoder.py) with the prefix recomputed at every forward -- the
reference the KV cache is tested against -- so it gives the tokens `nbdiff generate` gives: same block
alignment, token shift, committed-block encoding (context- or block-causal), unmasking rules, EOS
handling and seeded per-row sampling. It trades speed for that exactness (no KV cache).

Defaults come from the folder: `config.nbdiff` (block_size, token_shift, mask_kind, block_align,
mask_token_id), `generation_config` (eos / pad ids, max_new_tokens) and `max_position_embeddings`.
"""

from __future__ import annotations

from typing import Any

import torch

# --- package imports: replaced by the source of unmasking.py when exported ---
from nbdiff_megatron.inference.unmasking import (
    SCHEDULED_RULES,
    SamplingConfig,
    UnmaskingConfig,
    propose_tokens,
    row_generators,
    unmask_step,
)

# --- end of package imports ---


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


class _Batch:
    """Columns, validity and positions of a left-padded batch in aligned blocks (decoder.py layout)."""

    def __init__(self, prompts, block, align, max_new, max_context, mask_id, pad_id, device):
        lens = [len(p) for p in prompts]
        if align == "prompt":
            first = max(lens)
            pads = [first - n for n in lens]
        else:
            full = [(n // block) * block for n in lens]
            first = max(full)
            pads = [first - f for f in full]
        ends = [pad + min(n + max_new, max_context) for pad, n in zip(pads, lens)]
        columns = first + -(-(max(ends) - first) // block) * block
        cols = torch.arange(columns, device=device)
        pad_t = torch.tensor(pads, device=device)
        self.first, self.block = first, block
        self.origin = first if align == "prompt" else 0
        self.end = torch.tensor(ends, device=device)
        self.valid = (cols[None, :] >= pad_t[:, None]) & (cols[None, :] < self.end[:, None])
        self.positions = (cols[None, :] - pad_t[:, None]).clamp_min(0)
        self.tokens = torch.full((len(prompts), columns), mask_id, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            self.tokens[i, pads[i] : pads[i] + len(p)] = torch.tensor(p, device=device)
        self.tokens[~self.valid] = pad_id
        self.prompt_end = pad_t + torch.tensor(lens, device=device)

    def committed_visible(self, rows: torch.Tensor, stop: int, mask_kind: str) -> torch.Tensor:
        """Last key column of committed (x_0) rows: themselves, or the end of their block."""
        if mask_kind != "block_causal":
            return rows
        b, o = self.block, self.origin
        end = (torch.div(rows - o, b, rounding_mode="floor") + 1) * b + o
        return torch.clamp(end - 1, max=stop - 1)

    def stop_rows_after(self, rows: torch.Tensor, column: torch.Tensor) -> None:
        cols = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        self.valid &= ~(rows[:, None] & (cols[None, :] > column[:, None]))
        self.end = torch.where(rows, torch.minimum(self.end, column + 1), self.end)


def _forward(model, batch: _Batch, start: int, block: torch.Tensor, causal: bool, mask_kind: str):
    """Logits of `block` at columns start.. with the committed prefix re-encoded as x_0."""
    stop = start + block.shape[1]
    device = block.device
    prefix = batch.committed_visible(torch.arange(start, device=device), start, mask_kind)
    rows = torch.arange(start, stop, device=device)
    if causal:
        here = batch.committed_visible(rows, stop, mask_kind)
    else:
        here = torch.full_like(rows, stop - 1)
    visible = torch.cat([prefix, here])
    cols = torch.arange(stop, device=device)
    allowed = (cols[None, :] <= visible[:, None])[None] & batch.valid[:, None, :stop]
    allowed |= (cols[None, :] == cols[:, None])[None]  # every query sees itself (no empty rows)
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    tokens = torch.cat([batch.tokens[:, :start], block], dim=1)
    out = model(input_ids=tokens, attention_mask=mask, position_ids=batch.positions[:, :stop])
    return out.logits[:, start:].float()


def _finished(block, generated, masked, eos) -> torch.Tensor:
    """Rows holding a decoded EOS with nothing masked before it (decoder.finished_at_eos)."""
    is_eos = torch.isin(block, eos) & generated & ~masked
    width = block.shape[1]
    first = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1), width)
    before = torch.arange(width, device=block.device)[None, :] < first[:, None]
    return is_eos.any(dim=1) & ~(masked & before).any(dim=1)


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
    **unused: Any,
) -> torch.Tensor:
    """Block-decode `input_ids` ([b, P], left-padded, `attention_mask` 1 on real tokens).

    Returns `[b, P + n]`: the inputs followed by each row's generated tokens (the EOS that stopped a
    row included), right-padded with the pad id. Options are those of `nbdiff generate`.
    """
    nb = dict(getattr(model.config, "nbdiff", None) or {})
    gen_cfg = generation_config or getattr(model, "generation_config", None)
    block = int(block_size or nb.get("block_size") or 32)
    shift = nb.get("token_shift", True) if token_shift is None else token_shift
    kind = mask_kind or nb.get("mask_kind") or "context_causal"
    align = block_align or nb.get("block_align") or "document"
    mask_id = int(nb.get("mask_token_id", getattr(model.config, "mask_token_id", 0)))
    eos_ids = _ids(getattr(gen_cfg, "eos_token_id", None))
    pad_id = getattr(gen_cfg, "pad_token_id", None)
    pad_id = int(pad_id if pad_id is not None else (eos_ids[0] if eos_ids else mask_id))
    if max_new_tokens is None:
        max_new_tokens = int(getattr(gen_cfg, "max_new_tokens", None) or 256)
    max_context = int(model.config.max_position_embeddings)
    rule = unmasking or ("static" if steps_per_block is not None else "confidence")
    if threshold is None:
        threshold = 1.0 if rule in ("entropy", "entropy_bounded") else 0.9
    rules = UnmaskingConfig(rule, threshold, tokens_per_step, steps_per_block)
    sampling = SamplingConfig(temperature, top_p, top_k)
    sub = sub_block_size or block
    if kind not in ("context_causal", "block_causal") or align not in ("document", "prompt"):
        raise ValueError(f"unknown mask_kind {kind!r} or block_align {align!r}")
    if block % sub:
        raise ValueError(f"sub_block_size {sub} must divide block_size {block}")
    steps_per_unit = None if rule not in SCHEDULED_RULES else steps_per_block // (block // sub)

    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]
    n_rows = len(prompts)
    for i, p in enumerate(prompts):
        if not p or len(p) >= max_context:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the context is {max_context}")
    generators = row_generators(seed, row_ids if row_ids is not None else range(n_rows))
    batch = _Batch(prompts, block, align, max_new_tokens, max_context, mask_id, pad_id, device)
    eos = torch.tensor(eos_ids or [-1], device=device)
    no_mask = torch.tensor([mask_id], device=device)
    active = torch.ones(n_rows, dtype=torch.bool, device=device)
    reasons = ["length"] * n_rows
    offsets = torch.arange(block, device=device)
    last = None
    if batch.first > 0:
        last = _forward(model, batch, 0, batch.tokens[:, : batch.first], True, kind)[:, -1]
    cursor = batch.first
    while cursor < batch.tokens.shape[1] and bool(active.any()):
        cols = slice(cursor, cursor + block)
        current = batch.tokens[:, cols].clone()
        valid = batch.valid[:, cols]
        generated = valid & ((cursor + offsets)[None, :] >= batch.prompt_end[:, None])
        generated &= active[:, None]
        current[generated] = mask_id
        current[~valid] = pad_id
        masked = generated.clone()
        running = active.clone()

        if shift and bool(masked[:, 0].any()):
            first_tok, _ = propose_tokens(
                last.index_fill(-1, no_mask, float("-inf")), sampling, generators, masked[:, 0]
            )
            current[:, 0] = torch.where(masked[:, 0], first_tok, current[:, 0])
            masked[:, 0] = False
            if eos_ids:
                running &= ~_finished(current, generated & running[:, None], masked, eos)
                masked &= running[:, None]
        for sub_start in range(0, block, sub):
            in_sub = torch.zeros_like(masked)
            in_sub[:, sub_start : sub_start + sub] = True
            step = 0
            while bool((masked & in_sub).any()):
                logits = _forward(model, batch, cursor, current, False, kind)
                if shift:
                    logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
                proposal, chosen = unmask_step(
                    logits.index_fill(-1, no_mask, float("-inf")),
                    masked & in_sub,
                    rules,
                    sampling,
                    generators,
                    steps_left=None if steps_per_unit is None else steps_per_unit - step,
                )
                current = torch.where(chosen, proposal, current)
                masked &= ~chosen
                step += 1
                if eos_ids:
                    running &= ~_finished(current, generated & running[:, None], masked, eos)
                    masked &= running[:, None]
        is_eos = torch.isin(current, eos) & generated
        hit = is_eos.any(dim=1) & active
        if bool(hit.any()):
            first_eos = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1), block)
            batch.stop_rows_after(hit, cursor + first_eos)
            for i in hit.nonzero().flatten().tolist():
                reasons[i] = "eos"
        active &= ~hit
        active &= ~(batch.end <= cursor + block)
        batch.tokens[:, cols] = current
        if bool(active.any()):
            last = _forward(model, batch, cursor, current, True, kind)[:, -1]
        cursor += block

    outputs = []
    for i in range(n_rows):
        outputs.append(batch.tokens[i, int(batch.prompt_end[i]) : int(batch.end[i])].tolist())
    width = max(len(o) for o in outputs)
    new = torch.full((n_rows, width), pad_id, dtype=torch.long, device=device)
    for i, o in enumerate(outputs):
        new[i, : len(o)] = torch.tensor(o, dtype=torch.long, device=device)
    generate.stop_reasons = reasons  # type: ignore[attr-defined]  # what stopped each row
    return torch.cat([input_ids, new], dim=1)
