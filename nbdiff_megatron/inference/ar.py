"""Autoregressive baseline decoding of the same weights: one token per forward, KV cache.

The side-by-side reference for block decoding (NBDIFF.md §7: the point is the speed-up over AR decoding of
the same model). Prompts are left-padded to a common length; padding is masked out of attention and
positions start at 0 at each row's first real token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from nbdiff_megatron.errors import InferenceError
from nbdiff_megatron.inference.decoder import setup_decoder
from nbdiff_megatron.inference.refinement import (
    DecodeConfig,
    DecodeOutput,
    DecodeStats,
    attention_allowed,
    check_prompts,
)
from nbdiff_megatron.inference.unmasking import propose_tokens, row_generators


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
        **overrides: Any,
    ) -> DecodeOutput:
        """Decode every prompt; `callback(step, new_tokens_per_row)` runs after each token.

        `stop(row, generated_ids)` is asked after each token of a running row; True stops it there.
        `row_ids` name the prompts for the sampling seed, as in `BlockDecoder.generate`.
        """
        config = replace(self.config, **overrides) if overrides else self.config
        began = time.perf_counter()
        prompts = check_prompts(prompts, self.max_context)
        runner = self.runner
        device = runner.device
        batch = len(prompts)
        width = max(len(p) for p in prompts)
        budgets = [min(config.max_new_tokens, self.max_context - len(p)) for p in prompts]
        columns = width + max(budgets)
        pads = torch.tensor([width - len(p) for p in prompts], device=device)
        cols = torch.arange(columns, device=device)
        valid = cols[None, :] >= pads[:, None]
        positions = (cols[None, :] - pads[:, None]).clamp_min(0)
        tokens = torch.full((batch, columns), self.pad_id, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            tokens[i, width - len(p) : width] = torch.tensor(p)
        cache = runner.new_cache(columns) if config.use_cache else None
        row_ids = list(range(batch)) if row_ids is None else list(row_ids)
        if len(row_ids) != batch:
            raise InferenceError(f"row_ids has {len(row_ids)} entries for {batch} prompts")
        generator = row_generators(config.seed, row_ids)
        stats = DecodeStats(prefill_tokens=sum(len(p) for p in prompts))
        nfe_start = runner.forward_passes

        def forward(start: int, stop: int) -> torch.Tensor:
            visible = torch.arange(start if cache is not None else 0, stop, device=device)
            if cache is not None:
                allowed = attention_allowed(valid[:, :stop], start, stop - start, visible)
                return runner.forward(
                    tokens[:, start:stop],
                    positions[:, start:stop],
                    allowed,
                    cache=cache,
                    commit=True,
                )[:, -1]
            allowed = attention_allowed(valid[:, :stop], 0, stop, visible)
            return runner.forward(tokens[:, :stop], positions[:, :stop], allowed)[:, -1]

        active = torch.ones(batch, dtype=torch.bool, device=device)
        outputs: list[list[int]] = [[] for _ in range(batch)]
        stop_reason = ["length"] * batch
        last = forward(0, width)
        stats.row_forward_passes += batch
        for step in range(max(budgets)):
            column = width + step
            if self.mask_id is not None:
                # [MASK] is an input symbol of the diffusion half, never an answer.
                last = last.index_fill(
                    -1, torch.tensor([self.mask_id], device=device), float("-inf")
                )
            next_tokens, _ = propose_tokens(last, config.sampling, generator, active)
            tokens[:, column] = torch.where(active, next_tokens, self.pad_id)
            new_tokens: list[list[int]] = [[] for _ in range(batch)]
            for i in range(batch):
                if not bool(active[i]):
                    continue
                token = int(next_tokens[i])
                new_tokens[i].append(token)
                stats.generated_tokens += 1
                if config.stop_at_eos and token in self.eos_ids:
                    stop_reason[i] = "eos"
                    active[i] = False
                    continue
                outputs[i].append(token)
                if stop is not None and stop(i, outputs[i]):
                    stop_reason[i] = "stop"
                    active[i] = False
                elif len(outputs[i]) >= budgets[i]:
                    active[i] = False
                    stop_reason[i] = (
                        "context" if len(prompts[i]) + budgets[i] >= self.max_context else "length"
                    )
            # Finished rows keep riding along as padding that nobody attends to.
            valid[:, column] &= active | torch.tensor(
                [bool(new_tokens[i]) for i in range(batch)], device=device
            )
            if callback is not None:
                callback(step, new_tokens)
            if not bool(active.any()):
                break
            last = forward(column, column + 1)
            stats.row_forward_passes += int(active.sum())
        stats.forward_passes = runner.forward_passes - nfe_start
        stats.seconds = time.perf_counter() - began
        return DecodeOutput(tokens=outputs, stop_reasons=stop_reason, stats=stats)
