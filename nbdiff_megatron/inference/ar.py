"""Autoregressive baseline decoding of the same weights: one token per forward, KV cache.

The side-by-side reference for block decoding (the point of NBDiff is the speed-up over AR decoding of
the same model). AR decoding is the refinement loop (refinement.py) with blocks of one token and token
shift: each block's only token is the prediction of the last committed position, and committing it
is the next forward. So the AR baseline shares the block decoder's layout, input checks, stop reasons
and seeded per-row sampling (and `BlockDecoder(block_size=1)` gives the same tokens and forwards).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from nbdiff_megatron.inference.decoder import BlockDecoder, setup_decoder
from nbdiff_megatron.inference.refinement import DecodeConfig
from nbdiff_megatron.inference.unmasking import UnmaskingConfig


class ARDecoder(BlockDecoder):
    """Greedy / sampling next-token decoding with a KV cache (reads max_new_tokens, sampling, seed,
    stop_at_eos and use_cache of a DecodeConfig; the block options are ignored). `generate` is the
    block decoder's, with `loop_config`'s one-token blocks: `callback` runs after each token, `stop`
    is asked after each token."""

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
        # not BlockDecoder.__init__: an AR model may have no [MASK] id
        self.mask_id = None if mask_id is None else int(mask_id)
        setup_decoder(self, model, eos_ids, pad_id, max_context, config, overrides, 0)

    def loop_config(self, config: DecodeConfig) -> DecodeConfig:
        """Blocks of one token with token shift: each block is the next-token prediction."""
        return replace(
            config,
            block_size=1,
            sub_block_size=None,
            token_shift=True,
            mask_kind="context_causal",
            block_align="document",
            sub_block_cache=False,
            unmasking=UnmaskingConfig(),
        )
