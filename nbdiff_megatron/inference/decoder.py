"""`BlockDecoder`: block-diffusion decoding of an NBDiff megatron-core model with a KV cache
(docs/DECODING.md; Fast-dLLM v2 style).

The refinement loop, its batch layout, input checks and stop reasons live in refinement.py, shared with
the exported HF decoder (hf_generate.py); this module binds them to a megatron-core model through
kv_cache.ModelRunner. The names below are re-exported from refinement.py for the callers that import
them from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from nbdiff_megatron.errors import InferenceError
from nbdiff_megatron.inference.kv_cache import ModelRunner
from nbdiff_megatron.inference.refinement import (
    BLOCK_ALIGNS,
    MASK_KINDS,
    STOP_REASONS,
    BatchLayout,
    DecodeConfig,
    DecodeOutput,
    DecodeSession,
    DecodeStats,
    aligned_layout,
    attention_allowed,
    check_prompts,
    decode_batch,
    finished_at_eos,
    new_session,
    prompt_lists,
)

__all__ = [
    "BLOCK_ALIGNS",
    "MASK_KINDS",
    "STOP_REASONS",
    "BatchLayout",
    "BlockDecoder",
    "DecodeConfig",
    "DecodeOutput",
    "DecodeSession",
    "DecodeStats",
    "aligned_layout",
    "attention_allowed",
    "finished_at_eos",
    "prompt_lists",
    "setup_decoder",
]


def setup_decoder(
    decoder: Any,
    model: torch.nn.Module,
    eos_ids: Sequence[int],
    pad_id: int | None,
    max_context: int | None,
    config: DecodeConfig | None,
    overrides: dict[str, Any],
    default_pad: int,
) -> None:
    """What the block and the AR decoders set up alike: runner, stop ids, padding, context, config."""
    decoder.runner = ModelRunner(model)
    decoder.runner.model.eval()
    decoder.eos_ids = [int(e) for e in eos_ids]
    fallback = decoder.eos_ids[0] if decoder.eos_ids else default_pad
    decoder.pad_id = int(pad_id if pad_id is not None else fallback)
    if max_context is None:
        cfg = getattr(decoder.runner.inner, "nbdiff_config", None)
        max_context = cfg.seq_length if cfg is not None else None
    if max_context is None:
        raise InferenceError("max_context is unknown: pass max_context= (the model's seq_length)")
    decoder.max_context = int(max_context)
    decoder.config = replace(config or DecodeConfig(), **overrides)


class BlockDecoder:
    """Block-diffusion decoder over an NBDiff megatron-core model (see the module docstring).

    Args:
        model: the model from `nbdiff_megatron.model.builder.build_model` (TP ranks all run the decoder
            with equal inputs; pipeline parallel size must be 1).
        mask_id: id of [MASK].
        eos_ids: ids that stop a row (EOS / end-of-turn).
        pad_id: id written into padded columns (never attended to); default eos_ids[0] or mask_id.
        max_context: most positions a row may use (prompt + generated); default model.seq_length.
        config: DecodeConfig; keyword overrides of its fields are accepted too.

    `generate(prompts)` returns a DecodeOutput (tokens per prompt, stop reasons, NFE / TPF / tokens/s).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        mask_id: int,
        eos_ids: Sequence[int] = (),
        pad_id: int | None = None,
        max_context: int | None = None,
        config: DecodeConfig | None = None,
        **overrides: Any,
    ) -> None:
        self.mask_id: int | None = int(mask_id)
        setup_decoder(self, model, eos_ids, pad_id, max_context, config, overrides, self.mask_id)

    # -------------------------------------------------------------------- helpers
    def check_prompts(self, prompts: Sequence[Sequence[int]] | torch.Tensor) -> list[list[int]]:
        """Normalised prompts; InferenceError for empty ones or ones that leave no room to generate."""
        return check_prompts(prompts, self.max_context)

    def start(
        self, prompts: Sequence[Sequence[int]] | torch.Tensor, config: DecodeConfig | None = None
    ) -> DecodeSession:
        """A session for `prompts` laid out in aligned blocks (prefill not run yet)."""
        return new_session(
            self.runner,
            self.check_prompts(prompts),
            config or self.config,
            max_context=self.max_context,
            mask_id=self.mask_id,
            pad_id=self.pad_id,
        )

    def loop_config(self, config: DecodeConfig) -> DecodeConfig:
        """The refinement loop's config for a call with `config` (ARDecoder: one-token blocks)."""
        return config

    def mask_suppressed(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` with [MASK] at -inf: it is an input symbol, never an answer."""
        return logits.index_fill(
            -1, torch.tensor([self.mask_id], device=logits.device), float("-inf")
        )

    # -------------------------------------------------------------------- generate
    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]] | torch.Tensor,
        *,
        callback: Callable[[int, list[list[int]]], None] | None = None,
        stop: Callable[[int, list[int]], bool] | None = None,
        row_ids: Sequence[int] | None = None,
        batch_size: int | None = None,
        **overrides: Any,
    ) -> DecodeOutput:
        """Decode every prompt; `callback(block_index, new_tokens_per_row)` runs after each block.

        `stop(row, generated_ids)` is asked after each block for every running row; True stops the row
        there (stop reason "stop"; e.g. a stop string appeared). `row_ids` name the prompts for the
        sampling seed (default 0..b-1): a prompt decoded with the same seed and row id samples the same
        tokens in any batch. `batch_size`: decode at most that many prompts at once, refilling the
        slot of a stopped prompt with the next one at the next block boundary (None: all at once);
        `callback` and `stop` then get prompt indices. `overrides` replace DecodeConfig fields for
        this call (e.g. `max_new_tokens=64`).
        """
        config = replace(self.config, **overrides) if overrides else self.config
        return decode_batch(
            self.runner,
            prompts,
            self.loop_config(config),
            # [MASK] is an input symbol of the diffusion half, never an answer; without one (an AR
            # model) the pad id only marks the columns not decoded yet
            mask_id=self.pad_id if self.mask_id is None else self.mask_id,
            suppress_mask=self.mask_id is not None,
            pad_id=self.pad_id,
            eos_ids=self.eos_ids,
            max_context=self.max_context,
            row_ids=row_ids,
            callback=callback,
            stop=stop,
            batch_size=batch_size,
        )
