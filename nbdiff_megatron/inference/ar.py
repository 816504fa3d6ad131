"""Autoregressive baseline decoding of the same weights: one token per forward, KV cache.

The side-by-side reference for block decoding (the point of NBDiff is the speed-up over AR decoding of
the same model). AR decoding is the refinement loop (refinement.py) with blocks of one token and token
shift: each block's only token is the prediction of the last committed position, and committing it
is the next forward. So the AR baseline shares the block decoder's layout, input checks, stop reasons
and seeded per-row sampling (and `BlockDecoder(block_size=1)` gives the same tokens and forwards).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from nbdiff_megatron.inference.decoder import setup_decoder
from nbdiff_megatron.inference.refinement import DecodeConfig, DecodeOutput, decode_batch
from nbdiff_megatron.inference.unmasking import UnmaskingConfig


class ARDecoder:
    """Greedy / sampling next-token decoding with a KV cache (reads max_new_tokens, sampling, seed,
    stop_at_eos and use_cache of a DecodeConfig; the block options are ignored)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eos_ids: Sequence[int] = (),
        mask_id: int | None = None,
        pad_id: int | None = None,
        max_context: int | None = None,
        config: DecodeConfig | None = None,
        **overrides: Any,
    ) -> None:
        self.mask_id = None if mask_id is None else int(mask_id)
        setup_decoder(self, model, eos_ids, pad_id, max_context, config, overrides, 0)

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
        """Decode every prompt; `callback(step, new_tokens_per_row)` runs after each token.

        `stop(row, generated_ids)` is asked after each token of a running row; True stops it there.
        `row_ids` name the prompts for the sampling seed and `batch_size` refills slots, as in
        `BlockDecoder.generate`.
        """
        config = replace(self.config, **overrides) if overrides else self.config
        one_token_blocks = replace(
            config,
            block_size=1,
            sub_block_size=None,
            token_shift=True,
            mask_kind="context_causal",
            block_align="document",
            sub_block_cache=False,
            unmasking=UnmaskingConfig(),
        )
        return decode_batch(
            self.runner,
            prompts,
            one_token_blocks,
            # [MASK] is an input symbol of the diffusion half, never an answer; without one the
            # pad id only marks the columns not decoded yet
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
