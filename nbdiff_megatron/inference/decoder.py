"""Block-diffusion decoding with a KV cache and parallel unmasking (docs/METHOD.md §7, Fast-dLLM v2 style).

Layout of a batch (one tensor of columns shared by every prompt):

    row i:  [pad ... pad | prompt, full blocks | prompt tail, [MASK] ... | [MASK] x B | ...]
             0                                 R (first active block)     R + B

Block alignment (`block_align`, docs/METHOD.md §7):
- "document" (default; how `nbdiff train` packs): blocks are aligned to *positions* (multiples of B from
  the first prompt token, position 0), exactly as in training (docs/METHOD.md §3, blocks counted from a
  document's start), so a prompt whose length is not a multiple of B leaves its last `P mod B` tokens
  inside the first active block, as fixed (unmasked) tokens of x_t.
- "prompt" (the NBDiff release's decoder): the first block starts right after the prompt; the prompt is
  committed context (for block_causal models, encoded in blocks counted backwards from its end).
Rows are left-padded so that every row's first active block starts at the same column R; padded
columns are masked out of attention and positions start at 0 at each row's first real token.

Per block: with token shift its first token is taken from the last committed logit (the causal, AR
prediction); the rest is refined by forwards over the block that read the cached prefix and attend
bidirectionally inside the block, without committing; each step unmasks the positions that pass the
unmasking rule (at least one), sub-block by sub-block when sub-blocks are set. The finished block is then
run once more to commit its k/v to the cache; that forward's last logit starts the next block.

How committed tokens are encoded follows the x_0 half of the model's training mask (`mask_kind`,
docs/METHOD.md §2-3): "context_causal" (NBDiff) encodes the prompt and every committed block causally
(`j <= i`); "block_causal" (BD3-LM / SDAR baseline, x_0 half `blk(j) <= blk(i)`) encodes each prompt
block and each committed block bidirectionally inside the block, causally across blocks, blocks counted
from the prompt's first token. Either way the last committed logit (the last token of a block sees its
whole block and every earlier one) is the x_0 logit that predicts the next block's first token.
A row stops at EOS (checked after every refinement step: as soon as an EOS is decoded with no masked
position before it, the row spends no further forward on its block), at `max_new_tokens` or at the
context length; rows stop independently and the batch stops when every row has.

`use_cache=False` recomputes the whole prefix at every forward (the reference the cache is tested against).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from nbdiff_megatron.errors import InferenceError
from nbdiff_megatron.inference.kv_cache import KVCache, ModelRunner
from nbdiff_megatron.inference.unmasking import (
    SCHEDULED_RULES,
    SamplingConfig,
    UnmaskingConfig,
    propose_tokens,
    row_generators,
    unmask_step,
)

# Training mask kinds whose x_0 half the decoder can reproduce in its cache (docs/METHOD.md §2).
MASK_KINDS = ("context_causal", "block_causal")
# Where blocks start (docs/METHOD.md §7): at multiples of B from the document start, or at the prompt's end.
BLOCK_ALIGNS = ("document", "prompt")


@dataclass(frozen=True)
class DecodeConfig:
    """Options of block decoding (the AR decoder reads max_new_tokens, sampling and seed)."""

    block_size: int = 32
    """B: tokens per block."""
    sub_block_size: int | None = None
    """Refine the block in sub-blocks of this size, left to right (None = the whole block at once)."""
    max_new_tokens: int = 256
    """Most tokens generated per prompt (EOS included)."""
    token_shift: bool = True
    """Logit i-1 predicts token i; each block's first token is then decoded autoregressively."""
    unmasking: UnmaskingConfig = field(default_factory=UnmaskingConfig)
    """Which masked tokens are committed at each refinement step."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Greedy (temperature 0) or sampling (temperature, top-p)."""
    use_cache: bool = True
    """KV cache of committed blocks (False recomputes the prefix each forward: the reference)."""
    stop_at_eos: bool = True
    """Stop a row at its first EOS token."""
    seed: int | None = None
    """Seed of the sampling generator (None = torch's global RNG)."""
    mask_kind: str = "context_causal"
    """x_0-half mask the model was trained with: committed blocks are encoded causally
    ("context_causal") or bidirectionally inside each block ("block_causal")."""
    block_align: str = "document"
    """Where blocks start: "document" (multiples of B from the prompt's first token, as trained with
    packing) or "prompt" (the first block starts right after the prompt)."""
    sub_block_cache: bool = False
    """Approximate (Fast-dLLM v2 style): after a sub-block is finished, the later refinement steps of
    the block reuse its k/v from the first forward of the next sub-block instead of re-encoding it
    (they forward only the columns from the active sub-block on). Needs sub_block_size and the cache;
    not exact: finished sub-blocks no longer see the later tokens of their block."""

    def __post_init__(self) -> None:
        if self.block_align not in BLOCK_ALIGNS:
            raise InferenceError(
                f"block_align must be one of {', '.join(BLOCK_ALIGNS)} (--block-align), got "
                f"{self.block_align!r}"
            )
        if self.mask_kind not in MASK_KINDS:
            raise InferenceError(
                f"mask_kind must be one of {', '.join(MASK_KINDS)} (the checkpoint's "
                f"curriculum.mask_kind), got {self.mask_kind!r}"
            )
        if (
            isinstance(self.block_size, bool)
            or not isinstance(self.block_size, int)
            or self.block_size < 1
        ):
            raise InferenceError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        if self.sub_block_size is not None:
            if (
                not isinstance(self.sub_block_size, int)
                or self.sub_block_size < 1
                or self.block_size % self.sub_block_size
            ):
                raise InferenceError(
                    f"sub_block_size={self.sub_block_size!r} must be a positive divisor of "
                    f"block_size={self.block_size} (e.g. block 32 = 4 sub-blocks of 8), or None"
                )
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise InferenceError(
                f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}"
            )
        if self.sub_block_cache and (self.sub_block_size is None or not self.use_cache):
            raise InferenceError(
                "--sub-block-cache needs --sub-block-size (smaller than the block) and the KV cache "
                "(no --no-cache)"
            )
        steps = self.unmasking.steps
        units = self.block_size // (self.sub_block_size or self.block_size)
        if self.unmasking.rule in SCHEDULED_RULES and steps is not None and steps % units:
            raise InferenceError(
                f"--steps-per-block {steps} must be a multiple of the {units} sub-blocks per block "
                f"(block_size {self.block_size} / sub_block_size {self.sub_block_size})"
            )


@dataclass
class DecodeStats:
    """Cost of one `generate` call."""

    forward_passes: int = 0
    """Model forwards over the batch (prefill, refinement steps, commits): the NFE."""
    generated_tokens: int = 0
    """Tokens returned over all rows, plus the EOS tokens that stopped rows."""
    row_forward_passes: int = 0
    """Sum over rows of the forwards each row took part in while it was still generating."""
    seconds: float = 0.0
    """Wall-clock time of the call."""
    prefill_tokens: int = 0
    """Prompt tokens encoded by the prefill (padding excluded)."""

    @property
    def tokens_per_forward(self) -> float:
        """TPF: generated tokens per forward pass, per sequence (hardware independent)."""
        return self.generated_tokens / max(self.row_forward_passes, 1)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second, over the whole batch."""
        return self.generated_tokens / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict[str, float]:
        """Plain dict for printing / JSON."""
        return {
            "nfe": self.forward_passes,
            "tokens": self.generated_tokens,
            "tpf": self.tokens_per_forward,
            "tokens_per_s": self.tokens_per_second,
            "seconds": self.seconds,
        }


@dataclass
class DecodeOutput:
    """Result of one `generate` call."""

    tokens: list[list[int]]
    """Generated ids per prompt, without the prompt and without the EOS that stopped the row."""
    stop_reasons: list[str]
    """Per prompt: "eos", "length" (max_new_tokens), "context" (model context exhausted) or "stop"."""
    stats: DecodeStats
    """NFE, TPF, tokens/s."""


# ----------------------------------------------------------------------------------- layout + masks
def prompt_lists(prompts: Sequence[Sequence[int]] | torch.Tensor) -> list[list[int]]:
    """Normalise prompts (list of id lists, or a LongTensor [b, P]) and reject empty ones."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        prompts = prompts.tolist()
    out = [list(map(int, p)) for p in prompts]
    if not out:
        raise InferenceError("no prompts given: pass at least one prompt")
    for i, p in enumerate(out):
        if not p:
            raise InferenceError(
                f"prompt {i} is empty: decoding needs at least one prompt token (e.g. a BOS or a "
                "chat-template header)"
            )
    return out


def attention_allowed(
    key_valid: torch.Tensor, query_start: int, query_len: int, visible_until: torch.Tensor
) -> torch.Tensor:
    """Dense mask `[b, q, K]` (True = may attend) of queries at columns query_start.. over keys 0..K-1.

    Query row r sees the valid keys at columns <= visible_until[r] (r for causal rows, the block's last
    column for rows of the active block); every query also sees itself, so padded rows never have an
    empty row (which would make SDPA return NaN and poison later layers).
    """
    num_keys = key_valid.shape[1]
    cols = torch.arange(num_keys, device=key_valid.device)
    rows = torch.arange(query_start, query_start + query_len, device=key_valid.device)
    allowed = (cols[None, :] <= visible_until[:, None]) & key_valid[:, None, :]
    return allowed | (cols[None, :] == rows[:, None])


@dataclass
class BatchLayout:
    """Where each row's tokens sit in the shared column tensor."""

    pads: list[int]
    """Left padding of each row."""
    prompt_lens: list[int]
    """Prompt length of each row."""
    first_block: int
    """R: the column where the first active block starts (the same for every row)."""


def aligned_layout(
    prompt_lens: Sequence[int], block_size: int, block_align: str = "document"
) -> BatchLayout:
    """Left padding that puts every row's blocks on the same columns: position-aligned blocks
    ("document"), or blocks starting at each prompt's end ("prompt")."""
    if block_align == "prompt":
        first = max(prompt_lens)
        return BatchLayout(
            pads=[first - p for p in prompt_lens], prompt_lens=list(prompt_lens), first_block=first
        )
    full = [(p // block_size) * block_size for p in prompt_lens]
    first = max(full)
    return BatchLayout(
        pads=[first - f for f in full], prompt_lens=list(prompt_lens), first_block=first
    )


class DecodeSession:
    """The state of decoding one batch: columns, validity, positions, cache, cursor.

    `prefill()`, `block_logits(block)` and `commit(block)` are the three kinds of forward; the decoders
    drive them, and tests call them directly (e.g. to compare with the training forward).
    """

    def __init__(
        self,
        runner: ModelRunner,
        prompts: list[list[int]],
        layout: BatchLayout,
        num_columns: int,
        *,
        budget_end: list[int],
        pad_id: int,
        mask_id: int,
        use_cache: bool,
        block_size: int | None = None,
        mask_kind: str = "context_causal",
        block_align: str = "document",
    ) -> None:
        if mask_kind not in MASK_KINDS:
            raise InferenceError(
                f"mask_kind must be one of {', '.join(MASK_KINDS)}, got {mask_kind!r}"
            )
        # Column where block boundaries are anchored: 0 with position-aligned blocks (the padding is
        # whole blocks), the common prompt end with prompt-aligned ones.
        self.block_origin = layout.first_block if block_align == "prompt" else 0
        if mask_kind == "block_causal":
            if block_size is None:
                raise InferenceError("mask_kind 'block_causal' needs the session's block_size")
            if block_align == "document" and (
                any(pad % block_size for pad in layout.pads) or layout.first_block % block_size
            ):
                # Column blocks equal position blocks only when the padding is whole blocks.
                raise InferenceError(
                    f"block_causal decoding needs left padding in whole blocks of {block_size} "
                    f"(aligned_layout); got pads {layout.pads}, first block {layout.first_block}"
                )
        self.block_size = block_size
        self.mask_kind = mask_kind
        device = runner.device
        batch = len(prompts)
        self.runner = runner
        self.layout = layout
        self.mask_id = mask_id
        self.pad_id = pad_id
        self.tokens = torch.full((batch, num_columns), mask_id, dtype=torch.long, device=device)
        cols = torch.arange(num_columns, device=device)
        pads = torch.tensor(layout.pads, device=device)
        self.start = pads  # first real column of each row
        self.end = torch.tensor(budget_end, device=device)  # one past the last usable column
        self.valid = (cols[None, :] >= pads[:, None]) & (cols[None, :] < self.end[:, None])
        self.positions = (cols[None, :] - pads[:, None]).clamp_min(0)
        for i, prompt in enumerate(prompts):
            self.tokens[i, layout.pads[i] : layout.pads[i] + len(prompt)] = torch.tensor(prompt)
        self.tokens[~self.valid] = pad_id
        self.prompt_end = pads + torch.tensor(layout.prompt_lens, device=device)
        self.cache: KVCache | None = runner.new_cache(num_columns) if use_cache else None
        self.cursor = 0  # columns < cursor are committed
        self.last_logits: torch.Tensor | None = None  # [b, V], causal logit at column cursor - 1

    @property
    def num_columns(self) -> int:
        """Columns of the batch tensor (padding + prompt + every block)."""
        return self.tokens.shape[1]

    def stop_rows_after(self, rows: torch.Tensor, column: torch.Tensor) -> None:
        """Rows `rows` (bool [b]) generate nothing beyond `column` (long [b]): later columns invalid."""
        cols = torch.arange(self.num_columns, device=self.tokens.device)
        beyond = rows[:, None] & (cols[None, :] > column[:, None])
        self.valid &= ~beyond
        self.end = torch.where(rows, torch.minimum(self.end, column + 1), self.end)

    def _committed_visible(self, rows: torch.Tensor, stop: int) -> torch.Tensor:
        """Last key column each committed row `rows` sees, as its x_0 row did in training.

        context_causal: itself (`j <= i`); block_causal: the end of its block (`blk(j) <= blk(i)`),
        capped at `stop - 1` (the end of what is being encoded: a short last block). Blocks are
        counted from `block_origin` (prompt alignment: backwards from the prompt's end, so its first
        block may be short); with document alignment columns and positions share block boundaries
        because the left padding is whole blocks.
        """
        if self.mask_kind != "block_causal":
            return rows
        block = self.block_size
        assert block is not None  # checked in __init__
        origin = self.block_origin
        block_end = (torch.div(rows - origin, block, rounding_mode="floor") + 1) * block + origin
        return torch.clamp(block_end - 1, max=stop - 1)

    def _run(self, start: int, block: torch.Tensor, causal: bool, commit: bool) -> torch.Tensor:
        """One forward of `block` at columns start..; `causal` = encode as committed (x_0) rows."""
        n = block.shape[1]
        stop = start + n
        rows = torch.arange(start, stop, device=block.device)
        if causal:
            visible = self._committed_visible(rows, stop)
        else:
            visible = torch.full_like(rows, stop - 1)
        if self.cache is not None:
            if self.cache.length != start:
                raise RuntimeError(
                    f"cache holds {self.cache.length} columns, forward starts at {start}"
                )
            allowed = attention_allowed(self.valid[:, :stop], start, n, visible)
            return self.runner.forward(
                block, self.positions[:, start:stop], allowed, cache=self.cache, commit=commit
            )
        # Recompute: the committed prefix is re-encoded (as x_0) in the same forward.
        prefix_rows = torch.arange(start, device=block.device)
        allowed = attention_allowed(
            self.valid[:, :stop],
            0,
            stop,
            torch.cat([self._committed_visible(prefix_rows, start), visible]),
        )
        tokens = torch.cat([self.tokens[:, :start], block], dim=1)
        logits = self.runner.forward(tokens, self.positions[:, :stop], allowed)
        return logits[:, start:]

    def prefill(self) -> torch.Tensor | None:
        """Encode the prompt columns before the first active block as committed blocks (causally, or
        block-causally for a block_causal model); returns their logits."""
        first = self.layout.first_block
        if first == 0:
            return None
        logits = self._run(0, self.tokens[:, :first], causal=True, commit=True)
        self.cursor = first
        self.last_logits = logits[:, -1]
        return logits

    def block_logits(self, block: torch.Tensor, reuse: int = 0) -> torch.Tensor:
        """Logits `[b, n, V]` of the active block (bidirectional, reads the prefix, commits nothing).

        `reuse` > 0 (sub-block cache, approximate): the block's first `reuse` columns are not
        re-encoded; their k/v are the ones the previous forward of this block left in the cache.
        Only the later columns are run; the first `reuse` rows of the result are zeros.
        """
        if reuse <= 0:
            return self._run(self.cursor, block, causal=False, commit=False)
        if self.cache is None:
            raise InferenceError("the sub-block cache needs the KV cache")
        start = self.cursor
        self.cache.length = start + reuse  # provisional: the finished sub-blocks' k/v
        try:
            tail = self._run(start + reuse, block[:, reuse:], causal=False, commit=False)
        finally:
            self.cache.length = start
        head = tail.new_zeros((tail.shape[0], reuse, tail.shape[2]))
        return torch.cat([head, tail], dim=1)

    def commit(self, block: torch.Tensor) -> torch.Tensor:
        """Write the finished block and encode it into the cache as a committed block (causally, or
        bidirectionally inside the block for block_causal); returns its logits `[b, n, V]`."""
        start = self.cursor
        self.tokens[:, start : start + block.shape[1]] = block
        logits = self._run(start, block, causal=True, commit=True)
        self.cursor = start + block.shape[1]
        self.last_logits = logits[:, -1]
        return logits


def finished_at_eos(
    block: torch.Tensor, generated: torch.Tensor, masked: torch.Tensor, eos: torch.Tensor
) -> torch.Tensor:
    """Rows `[b]` of the active block that hold a decoded EOS with no masked position before it.

    The tokens up to that EOS are final (nothing before it can change), so the row is finished and
    the rest of its block need not be refined: EOS is caught at refinement-step granularity.
    """
    is_eos = torch.isin(block, eos) & generated & ~masked
    width = block.shape[1]
    first = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1), width)
    before = torch.arange(width, device=block.device)[None, :] < first[:, None]
    return is_eos.any(dim=1) & ~(masked & before).any(dim=1)


# ----------------------------------------------------------------------------------- the decoder
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
        self.mask_id = int(mask_id)
        setup_decoder(self, model, eos_ids, pad_id, max_context, config, overrides, self.mask_id)

    # -------------------------------------------------------------------- helpers
    def check_prompts(self, prompts: Sequence[Sequence[int]] | torch.Tensor) -> list[list[int]]:
        """Normalised prompts; InferenceError for empty ones or ones that leave no room to generate."""
        prompts = prompt_lists(prompts)
        for i, p in enumerate(prompts):
            if len(p) >= self.max_context:
                raise InferenceError(
                    f"prompt {i} has {len(p)} tokens, the model's context is {self.max_context}: "
                    "shorten the prompt (at least one position must be left to generate)"
                )
        return prompts

    def start(
        self, prompts: Sequence[Sequence[int]] | torch.Tensor, config: DecodeConfig | None = None
    ) -> DecodeSession:
        """A session for `prompts` laid out in aligned blocks (prefill not run yet)."""
        config = config or self.config
        prompts = self.check_prompts(prompts)
        block = config.block_size
        layout = aligned_layout([len(p) for p in prompts], block, config.block_align)
        budget_end = [
            pad + min(len(p) + config.max_new_tokens, self.max_context)
            for pad, p in zip(layout.pads, prompts)
        ]
        first = layout.first_block
        blocks = -(-(max(budget_end) - first) // block)
        return DecodeSession(
            self.runner,
            prompts,
            layout,
            first + blocks * block,
            budget_end=budget_end,
            pad_id=self.pad_id,
            mask_id=self.mask_id,
            use_cache=config.use_cache,
            block_size=block,
            mask_kind=config.mask_kind,
            block_align=config.block_align,
        )

    def _no_mask(self, logits: torch.Tensor) -> torch.Tensor:
        # [MASK] is an input symbol, never an answer.
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
        **overrides: Any,
    ) -> DecodeOutput:
        """Decode every prompt; `callback(block_index, new_tokens_per_row)` runs after each block.

        `stop(row, generated_ids)` is asked after each block for every running row; True stops the row
        there (stop reason "stop"; e.g. a stop string appeared). `row_ids` name the prompts for the
        sampling seed (default 0..b-1): a prompt decoded with the same seed and row id samples the same
        tokens in any batch. `overrides` replace DecodeConfig fields for this call (e.g.
        `max_new_tokens=64`).
        """
        config = replace(self.config, **overrides) if overrides else self.config
        began = time.perf_counter()
        session = self.start(prompts, config)
        batch = session.tokens.shape[0]
        row_ids = list(range(batch)) if row_ids is None else list(row_ids)
        if len(row_ids) != batch:
            raise InferenceError(f"row_ids has {len(row_ids)} entries for {batch} prompts")
        generator = row_generators(config.seed, row_ids)
        stats = DecodeStats(prefill_tokens=sum(session.layout.prompt_lens))
        nfe_start = self.runner.forward_passes
        device = session.tokens.device
        active = torch.ones(batch, dtype=torch.bool, device=device)
        stop_reason = ["length"] * batch
        history: list[list[int]] = [[] for _ in range(batch)]
        eos = torch.tensor(self.eos_ids or [-1], device=device)
        block_size = config.block_size
        sub = config.sub_block_size or block_size
        steps_per_unit = None
        if config.unmasking.rule in SCHEDULED_RULES:
            steps_per_unit = config.unmasking.steps // (block_size // sub)

        def count_forward(rows: torch.Tensor) -> None:
            stats.row_forward_passes += int(rows.sum())

        if session.prefill() is not None:
            count_forward(active)
        block_index = 0
        positions = torch.arange(block_size, device=device)
        while session.cursor < session.num_columns and bool(active.any()):
            c = session.cursor
            cols = slice(c, c + block_size)
            block = session.tokens[:, cols].clone()
            valid = session.valid[:, cols]
            generated = valid & ((c + positions)[None, :] >= session.prompt_end[:, None])
            generated &= active[:, None]
            block[generated] = self.mask_id
            block[~valid] = self.pad_id
            masked = generated.clone()
            running = active.clone()  # rows still refining this block (an EOS stops a row early)

            check_eos = config.stop_at_eos and bool(self.eos_ids)

            if config.token_shift and bool(masked[:, 0].any()):
                # The block's first token is the AR prediction of the last committed position.
                first, _ = propose_tokens(
                    self._no_mask(session.last_logits), config.sampling, generator, masked[:, 0]
                )
                block[:, 0] = torch.where(masked[:, 0], first, block[:, 0])
                masked[:, 0] = False
                if check_eos:
                    running &= ~finished_at_eos(block, generated & running[:, None], masked, eos)
                    masked &= running[:, None]

            for sub_start in range(0, block_size, sub):
                in_sub = torch.zeros_like(masked)
                in_sub[:, sub_start : sub_start + sub] = True
                step = 0
                while bool((masked & in_sub).any()):
                    # sub-block cache: the first step of a sub-block refreshes the whole block's
                    # k/v; its later steps reuse those of the finished sub-blocks (with token shift
                    # the last finished column is re-run: its logit predicts this sub-block's start)
                    reuse = 0
                    if config.sub_block_cache and step > 0:
                        reuse = max(sub_start - int(config.token_shift), 0)
                    logits = session.block_logits(block, reuse)
                    count_forward(running)
                    if config.token_shift:
                        # position j is predicted by the logit at j - 1 (j = 0 was filled above)
                        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
                    proposal, chosen = unmask_step(
                        self._no_mask(logits),
                        masked & in_sub,
                        config.unmasking,
                        config.sampling,
                        generator,
                        steps_left=None if steps_per_unit is None else steps_per_unit - step,
                    )
                    block = torch.where(chosen, proposal, block)
                    masked &= ~chosen
                    step += 1
                    if check_eos:
                        running &= ~finished_at_eos(
                            block, generated & running[:, None], masked, eos
                        )
                        masked &= running[:, None]

            # Rows that produced EOS (or hit their budget) in this block stop here.
            new_tokens: list[list[int]] = [[] for _ in range(batch)]
            for i in range(batch):
                if not bool(active[i]):
                    continue
                row_cols = generated[i].nonzero().flatten().tolist()
                for j in row_cols:
                    token = int(block[i, j])
                    new_tokens[i].append(token)
                    stats.generated_tokens += 1
                    if config.stop_at_eos and token in self.eos_ids:
                        stop_reason[i] = "eos"
                        break
            hit_eos = torch.tensor([r == "eos" for r in stop_reason], device=device) & active
            if bool(hit_eos.any()):
                is_eos = torch.isin(block, eos) & generated
                first_eos = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1), block_size)
                session.stop_rows_after(hit_eos, c + first_eos)
            active &= ~hit_eos
            done_budget = session.end <= c + block_size
            for i in range(batch):
                if bool(active[i]) and bool(done_budget[i]):
                    limit = session.layout.pads[i] + self.max_context
                    stop_reason[i] = "context" if int(session.end[i]) >= limit else "length"
            active &= ~done_budget
            for i in range(batch):
                history[i].extend(new_tokens[i])
            if stop is not None:
                for i in range(batch):
                    if bool(active[i]) and stop(i, history[i]):
                        stop_reason[i] = "stop"
                        row = torch.arange(batch, device=device) == i
                        session.stop_rows_after(
                            row, torch.full_like(session.end, c + block_size - 1)
                        )
                        active[i] = False
            if bool(active.any()):
                session.commit(block)
                count_forward(active)
            else:
                session.tokens[:, cols] = block
            if callback is not None:
                callback(block_index, new_tokens)
            block_index += 1

        stats.forward_passes = self.runner.forward_passes - nfe_start
        stats.seconds = time.perf_counter() - began
        outputs = []
        for i in range(batch):
            start = int(session.prompt_end[i])
            end = int(session.end[i])
            row = session.tokens[i, start:end].tolist()
            if stop_reason[i] == "eos":
                row = row[:-1]
            outputs.append(row)
        return DecodeOutput(tokens=outputs, stop_reasons=stop_reason, stats=stats)
