"""The block-refinement loop: one implementation for `nbdiff generate` (megatron-core model, KV cache)
and for the exported HF decoder (`custom_generate/generate.py`, which ships this file inlined).

Needs torch and unmasking.py only, so that the export can carry it; a model enters through a *runner*
(`forward(tokens, positions, allowed, *, cache, commit_columns)`, `new_cache(n)`, `device`,
`forward_passes`): kv_cache.ModelRunner for megatron-core, hf_generate.HFRunner for transformers.

Layout of a batch (one tensor of columns shared by every prompt; docs/DECODING.md):

    row i:  [pad ... pad | prompt, full blocks | prompt tail, [MASK] ... | [MASK] x B | ...]
             0                                 R (first active block)     R + B

Block alignment (`block_align`):
- "document" (default; how `nbdiff train` packs): blocks are aligned to *positions* (multiples of B from
  the first prompt token, position 0), exactly as in training (blocks counted from a document's start),
  so a prompt whose length is not a multiple of B leaves its last `P mod B` tokens inside the first
  active block, as fixed (unmasked) tokens of x_t.
- "prompt" (the NBDiff release's decoder): the first block starts right after the prompt; the prompt is
  committed context (for block_causal models, encoded in blocks counted backwards from its end).
Rows are left-padded so that every row's first active block starts at the same column R; padded
columns are masked out of attention and positions start at 0 at each row's first real token.

Per block: with token shift its first token is taken from the last committed logit (the causal, AR
prediction); the rest is refined by forwards over the block that read the committed prefix and attend
bidirectionally inside the block, without committing; each step unmasks the positions that pass the
unmasking rule (at least one), sub-block by sub-block when sub-blocks are set. The finished block is then
encoded as committed context; that forward's last logit starts the next block.

Fused commit (default; `fused_commit=False` is the release's schedule): the commit forward also runs the
next block's first refinement step, in one forward over [finished block, committed; next block,
bidirectional]. Without token shift the next block starts fully masked, so that step is always the one
the unfused decoder runs. With token shift the next block's first token comes from the commit's own last
logit, so it is *guessed* (argmax of the last refinement forward's final-column logit, the column token
shift drops): when the commit's real token (drawn as the unfused decoder draws it) equals the guess in
every row, the fused step's logits are used; otherwise they are dropped and the step is run again. The
tokens are those of the unfused decoder either way; only the forward count changes.

How committed tokens are encoded follows the x_0 half of the model's training mask (`mask_kind`):
"context_causal" (NBDiff) encodes the prompt and every committed block causally (`j <= i`);
"block_causal" (BD3-LM / SDAR baseline, x_0 half `blk(j) <= blk(i)`) encodes each prompt block and each
committed block bidirectionally inside the block, causally across blocks. Either way the last committed
logit is the x_0 logit that predicts the next block's first token.

A row stops at EOS (checked after every refinement step: as soon as an EOS is decoded with no masked
position before it, the row spends no further forward on its block), at `max_new_tokens` (stop reason
"length"), at the model's context (stop reason "context") or when the caller's `stop` says so ("stop");
rows stop independently and the batch stops when every row has.

A full batch (`decode_batch(..., batch_size=N)` with more prompts than N): the rows are slots; at the block
boundary after a row stops, the next waiting prompt takes its slot, laid out so that its committed prompt
head ends at the batch's cursor (`DecodeSession.refill`: the column window and the KV cache slide to the
columns the live rows use, so they do not grow with the prompts decoded), and its head is encoded by a
forward of the refilled rows only (`prefill_rows`). Every prompt gets the tokens it gets alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# --- package imports: replaced by the exported decoder's own definitions (convert/hf_export.py) ---
from nbdiff_megatron.errors import InferenceError
from nbdiff_megatron.inference.unmasking import (
    SCHEDULED_RULES,
    SamplingConfig,
    UnmaskingConfig,
    propose_tokens,
    row_generators,
    unmask_step,
)

# --- end of package imports ---

# Training mask kinds whose x_0 half the decoder can reproduce (docs/DECODING.md, "Layout").
MASK_KINDS = ("context_causal", "block_causal")
# Where blocks start: at multiples of B from the document start, or at the prompt's end.
BLOCK_ALIGNS = ("document", "prompt")
# Why a row stopped: an EOS id, max_new_tokens, the model's context, the caller's stop function.
STOP_REASONS = ("eos", "length", "context", "stop")


def require_positive_int(name: str, value: Any) -> None:
    """InferenceError unless `value` is an integer >= 1 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InferenceError(f"{name} must be an integer >= 1, got {value!r}")


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
    fused_commit: bool = True
    """Commit a finished block in the same forward as the next block's first refinement step (exact:
    the tokens of the unfused decoder, fewer forwards); False = one commit forward per block."""

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
        require_positive_int("block_size", self.block_size)
        if self.sub_block_size is not None and (
            not isinstance(self.sub_block_size, int)
            or self.sub_block_size < 1
            or self.block_size % self.sub_block_size
        ):
            raise InferenceError(
                f"sub_block_size={self.sub_block_size!r} must be a positive divisor of "
                f"block_size={self.block_size} (e.g. block 32 = 4 sub-blocks of 8), or None"
            )
        require_positive_int("max_new_tokens", self.max_new_tokens)
        if self.sub_block_cache and (self.sub_block_size is None or not self.use_cache):
            raise InferenceError(
                "--sub-block-cache needs --sub-block-size (smaller than the block) and the KV cache "
                "(no --no-cache)"
            )
        steps = self.unmasking.steps
        if self.unmasking.rule in SCHEDULED_RULES and steps is not None and steps % self.units:
            raise InferenceError(
                f"--steps-per-block {steps} must be a multiple of the {self.units} sub-blocks per "
                f"block (block_size {self.block_size} / sub_block_size {self.sub_block_size})"
            )

    @property
    def units(self) -> int:
        """Sub-blocks per block (1 without sub-blocks)."""
        return self.block_size // (self.sub_block_size or self.block_size)

    @property
    def steps_per_unit(self) -> int | None:
        """Refinement steps per sub-block of the scheduled rules (None for the threshold rules)."""
        if self.unmasking.rule not in SCHEDULED_RULES:
            return None
        return self.unmasking.steps // self.units


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
    fused_commits: int = 0
    """Commit forwards that also ran the next block's first refinement step."""
    fused_hits: int = 0
    """Fused steps used as the next block's first refinement step in every row: each saved one
    forward."""
    fused_misses: int = 0
    """Fused steps whose guessed first token of the next block was wrong in some rows: those rows
    were run again (in a forward of those rows only); the others kept the fused step."""

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
            "fused_commits": self.fused_commits,
            "fused_hits": self.fused_hits,
            "fused_misses": self.fused_misses,
        }


@dataclass
class DecodeOutput:
    """Result of one `generate` call."""

    tokens: list[list[int]]
    """Generated ids per prompt, without the prompt and without the EOS that stopped the row."""
    stop_reasons: list[str]
    """Per prompt, one of STOP_REASONS: "eos", "length" (max_new_tokens), "context" (the model's
    context is full) or "stop" (the caller's stop function)."""
    stats: DecodeStats
    """NFE, TPF, tokens/s."""
    eos_tokens: list[int | None] = field(default_factory=list)
    """Per prompt, the EOS id that stopped it (None when it did not stop at EOS)."""


# ----------------------------------------------------------------------------------- input checks
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


def check_prompts(
    prompts: Sequence[Sequence[int]] | torch.Tensor, max_context: int
) -> list[list[int]]:
    """Normalised prompts; InferenceError for empty ones or ones that leave no room to generate."""
    prompts = prompt_lists(prompts)
    for i, p in enumerate(prompts):
        if len(p) >= max_context:
            raise InferenceError(
                f"prompt {i} has {len(p)} tokens, the model's context is {max_context}: "
                "shorten the prompt (at least one position must be left to generate)"
            )
    return prompts


def capped_budgets(
    prompts: Sequence[Sequence[int]], max_new_tokens: int, max_context: int
) -> dict[int, int]:
    """Rows whose `max_new_tokens` does not fit in the context: {row: tokens it can generate}."""
    return {
        i: max_context - len(p)
        for i, p in enumerate(prompts)
        if len(p) + max_new_tokens > max_context
    }


def unmasking_config(
    rule: str | None, threshold: float | None, k: int = 1, steps: int | None = None
) -> UnmaskingConfig:
    """The unmasking rule of the command line / `generate` options: "static" when only `steps` is
    given, else "confidence"; the threshold defaults to 0.9 (1.0 nats for the entropy rules)."""
    rule = rule or ("static" if steps is not None else "confidence")
    if steps is not None and rule not in SCHEDULED_RULES:
        raise InferenceError(
            f"--steps-per-block applies to --unmasking static or dynamic, not {rule!r}"
        )
    if threshold is None:
        threshold = 1.0 if rule in ("entropy", "entropy_bounded") else 0.9
    try:
        return UnmaskingConfig(rule, threshold, k, steps)
    except ValueError as exc:
        raise InferenceError(str(exc)) from exc


# ----------------------------------------------------------------------------------- layout + masks
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
    heads = [first_active_offset(p, block_size, block_align) for p in prompt_lens]
    first = max(heads)
    return BatchLayout(
        pads=[first - head for head in heads], prompt_lens=list(prompt_lens), first_block=first
    )


class DecodeSession:
    """The state of decoding one batch: columns, validity, positions, cache, cursor.

    `prefill()`, `block_logits(block)`, `commit(block)` and `commit_fused(block, next_block)` are the
    kinds of forward; the refinement loop drives them, and tests call them directly (e.g. to compare
    with the training forward).
    """

    def __init__(
        self,
        runner: Any,
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
        self.block_align = block_align
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
            row = torch.tensor(prompt, device=device)
            self.tokens[i, layout.pads[i] : layout.pads[i] + len(prompt)] = row
        self.tokens[~self.valid] = pad_id
        self.prompt_end = pads + torch.tensor(layout.prompt_lens, device=device)
        self.cache = runner.new_cache(num_columns) if use_cache else None
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
        capped at `stop - 1` (the end of what is being committed: a short last block). Blocks are
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

    def _run(
        self, start: int, block: torch.Tensor, committed: int, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One forward of `block` at columns start..; its first `committed` columns are encoded as
        committed (x_0) rows and advance the cache, the rest attend bidirectionally up to its end.

        `rows` (long [r]): a forward of those batch rows only (`block` is `[r, n]`); their cache
        columns from `start` on are written, the cache's committed length does not move."""
        n = block.shape[1]
        stop = start + n
        columns = torch.arange(start, stop, device=block.device)
        visible = torch.full_like(columns, stop - 1)
        if committed:
            visible[:committed] = self._committed_visible(columns[:committed], start + committed)
        valid, positions = self.valid, self.positions
        if rows is not None:
            valid, positions = valid[rows], positions[rows]
        if self.cache is not None:
            cache: Any = self.cache
            if rows is not None:
                cache = self.cache.rows(rows, start)
            elif self.cache.length != start:
                raise RuntimeError(
                    f"cache holds {self.cache.length} columns, forward starts at {start}"
                )
            allowed = attention_allowed(valid[:, :stop], start, n, visible)
            return self.runner.forward(
                block, positions[:, start:stop], allowed, cache=cache, commit_columns=committed
            )
        # Recompute: the committed prefix is re-encoded (as x_0) in the same forward.
        prefix_columns = torch.arange(start, device=block.device)
        allowed = attention_allowed(
            valid[:, :stop],
            0,
            stop,
            torch.cat([self._committed_visible(prefix_columns, start), visible]),
        )
        prefix = self.tokens[:, :start] if rows is None else self.tokens[rows, :start]
        logits = self.runner.forward(
            torch.cat([prefix, block], dim=1), positions[:, :stop], allowed
        )
        return logits[:, start:]

    def prefill(self) -> torch.Tensor | None:
        """Encode the prompt columns before the first active block as committed blocks (causally, or
        block-causally for a block_causal model); returns their logits."""
        first = self.layout.first_block
        if first == 0:
            return None
        logits = self._run(0, self.tokens[:, :first], committed=first)
        self.cursor = first
        self.last_logits = logits[:, -1]
        return logits

    def block_logits(
        self, block: torch.Tensor, reuse: int = 0, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits `[b, n, V]` of the active block (bidirectional, reads the prefix, commits nothing).

        `reuse` > 0 (sub-block cache, approximate): the block's first `reuse` columns are not
        re-encoded; their k/v are the ones the previous forward of this block left in the cache.
        Only the later columns are run; the first `reuse` rows of the result are zeros.
        `rows` (long [r], without `reuse`): the block of those batch rows only, `block` is `[r, n]`.
        """
        if reuse <= 0:
            return self._run(self.cursor, block, committed=0, rows=rows)
        if self.cache is None:
            raise InferenceError("the sub-block cache needs the KV cache")
        start = self.cursor
        self.cache.length = start + reuse  # provisional: the finished sub-blocks' k/v
        try:
            tail = self._run(start + reuse, block[:, reuse:], committed=0)
        finally:
            self.cache.length = start
        head = tail.new_zeros((tail.shape[0], reuse, tail.shape[2]))
        return torch.cat([head, tail], dim=1)

    def commit(self, block: torch.Tensor) -> torch.Tensor:
        """Write the finished block and encode it into the cache as a committed block (causally, or
        bidirectionally inside the block for block_causal); returns its logits `[b, n, V]`."""
        start = self.cursor
        self.tokens[:, start : start + block.shape[1]] = block
        logits = self._run(start, block, committed=block.shape[1])
        self.cursor = start + block.shape[1]
        self.last_logits = logits[:, -1]
        return logits

    def commit_fused(self, block: torch.Tensor, next_block: torch.Tensor) -> torch.Tensor:
        """`commit(block)` and `block_logits(next_block)` of the following columns in one forward
        (the cache advances over `block` only); returns the next block's logits `[b, n, V]`."""
        start = self.cursor
        n = block.shape[1]
        self.tokens[:, start : start + n] = block
        logits = self._run(start, torch.cat([block, next_block], dim=1), committed=n)
        self.cursor = start + n
        self.last_logits = logits[:, n - 1]
        return logits[:, n:]

    # ------------------------------------------------------------------ refilling (decode_batch)
    def refill(
        self, rows: list[int], prompts: list[list[int]], ends: list[int], live: torch.Tensor
    ) -> None:
        """Lay `prompts` out in the batch rows `rows` so that their first active block is the next
        one (at the cursor): the prompt's committed head ends at the cursor, its tail (document
        alignment) sits in that block. `ends[k]` is the column count prompt k may use (prompt +
        budget). The column window is first slid and resized to what the rows still decoding
        (`live`, bool [b]) and the new ones need, so it does not grow with the prompts decoded."""
        assert self.block_size is not None  # new_session sets it
        size, cursor = self.block_size, self.cursor
        heads = [first_active_offset(len(p), size, self.block_align) for p in prompts]
        pads = [cursor - head for head in heads]
        starts = [int(c) for c in self.start[live]] + pads
        row_ends = [int(c) for c in self.end[live]] + [pad + e for pad, e in zip(pads, ends)]
        # the live rows share the block grid of the cursor: round each end up to a block boundary
        last = max(cursor + -(-(end - cursor) // size) * size for end in row_ends)
        shift = min(starts)
        self.relocate(shift, last - shift)
        columns = torch.arange(self.num_columns, device=self.tokens.device)
        for row, prompt, pad, end in zip(rows, prompts, pads, ends):
            pad -= shift
            self.tokens[row] = self.mask_id
            self.tokens[row, pad : pad + len(prompt)] = torch.tensor(prompt, device=columns.device)
            self.valid[row] = (columns >= pad) & (columns < pad + end)
            self.tokens[row, ~self.valid[row]] = self.pad_id
            self.positions[row] = (columns - pad).clamp_min(0)
            self.start[row], self.end[row] = pad, pad + end
            self.prompt_end[row] = pad + len(prompt)
            self.layout.pads[row], self.layout.prompt_lens[row] = pad, len(prompt)

    def relocate(self, shift: int, num_columns: int) -> None:
        """Slide the column window: column c becomes c - shift, in `num_columns` columns (columns
        moved out are dropped: no live row uses them). Block boundaries move along (block_origin)."""
        if shift == 0 and num_columns == self.num_columns:
            return

        def moved(t: torch.Tensor, fill: Any) -> torch.Tensor:
            out = t.new_full((t.shape[0], num_columns), fill)
            lo, hi = max(shift, 0), min(t.shape[1], num_columns + shift)
            if hi > lo:
                out[:, lo - shift : hi - shift] = t[:, lo:hi]
            return out

        self.tokens = moved(self.tokens, self.pad_id)
        self.valid = moved(self.valid, False)
        self.positions = moved(self.positions, 0)
        self.start, self.end, self.prompt_end = (
            self.start - shift,
            self.end - shift,
            self.prompt_end - shift,
        )
        self.layout.pads = [pad - shift for pad in self.layout.pads]
        self.layout.first_block -= shift
        self.block_origin -= shift
        self.cursor -= shift
        if self.cache is not None:
            self.cache.relocate(shift, num_columns)

    def prefill_rows(self, rows: list[int]) -> None:
        """Encode the committed prompt heads of the refilled `rows` (one forward of those rows,
        left-padded to the longest head) and set their last committed logit."""
        index = torch.tensor(rows, device=self.tokens.device)
        width = int((self.cursor - self.start[index]).max())
        if width <= 0:
            return  # prompts shorter than a block (document alignment): nothing committed yet
        start = self.cursor - width
        block = self.tokens[index, start : self.cursor]
        logits = self._run(start, block, committed=width, rows=index)
        if self.last_logits is None:
            self.last_logits = logits.new_zeros((self.tokens.shape[0], logits.shape[-1]))
        self.last_logits = self.last_logits.clone()
        self.last_logits[index] = logits[:, -1]


def first_active_offset(prompt_len: int, block_size: int, block_align: str) -> int:
    """Position where a prompt's first active block starts: after its full blocks ("document") or
    after the whole prompt ("prompt")."""
    return prompt_len if block_align == "prompt" else (prompt_len // block_size) * block_size


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


def new_session(
    runner: Any,
    prompts: list[list[int]],
    config: DecodeConfig,
    *,
    max_context: int,
    mask_id: int,
    pad_id: int,
) -> DecodeSession:
    """A session for checked `prompts` laid out in aligned blocks (prefill not run yet)."""
    block = config.block_size
    layout = aligned_layout([len(p) for p in prompts], block, config.block_align)
    budget_end = [
        pad + min(len(p) + config.max_new_tokens, max_context)
        for pad, p in zip(layout.pads, prompts)
    ]
    first = layout.first_block
    blocks = -(-(max(budget_end) - first) // block)
    return DecodeSession(
        runner,
        prompts,
        layout,
        first + blocks * block,
        budget_end=budget_end,
        pad_id=pad_id,
        mask_id=mask_id,
        use_cache=config.use_cache,
        block_size=block,
        mask_kind=config.mask_kind,
        block_align=config.block_align,
    )


# ----------------------------------------------------------------------------------- the loop
@dataclass
class ActiveBlock:
    """The block being refined, for every row."""

    tokens: torch.Tensor
    """[b, B] ids: fixed tokens, decoded tokens and [MASK]."""
    generated: torch.Tensor
    """[b, B] columns this block generates (valid, past the prompt, row still active)."""
    masked: torch.Tensor
    """[b, B] generated columns not decoded yet."""
    running: torch.Tensor
    """[b] rows still refining this block (an EOS stops a row early)."""


class BlockRefinement:
    """The refinement loop over one session (see the module docstring); `run()` decodes it.

    The session's rows are *slots*: `prompts` (the session's, then the waiting ones) may hold more
    prompts than the session has rows, and then a slot whose prompt stopped takes the next waiting
    prompt at the next block boundary (`refill`), so the batch stays full. `generator` holds one
    generator per prompt (or None); `callback` and `stop` are called with prompt indices."""

    def __init__(
        self,
        session: DecodeSession,
        config: DecodeConfig,
        *,
        eos_ids: Sequence[int],
        max_context: int,
        generator: Any,
        callback: Callable[[int, list[list[int]]], None] | None = None,
        stop: Callable[[int, list[int]], bool] | None = None,
        suppress_mask: bool = True,
        prompts: Sequence[list[int]],
    ) -> None:
        self.session, self.config = session, config
        self.eos_ids = [int(e) for e in eos_ids]
        self.max_context = max_context
        self.generator = generator
        self.callback, self.stop = callback, stop
        batch, device = session.tokens.shape[0], session.tokens.device
        self.device = device
        self.eos = torch.tensor(self.eos_ids or [-1], device=device)
        self.suppressed = torch.tensor(
            [session.mask_id] if suppress_mask else [], dtype=torch.long, device=device
        )
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        # per slot: the prompt it decodes, why it stopped, the EOS that stopped it, its tokens so far
        self.row_prompt = list(range(batch))
        self.row_reasons = ["length"] * batch
        self.row_eos: list[int | None] = [None] * batch
        self.history: list[list[int]] = [[] for _ in range(batch)]
        self.in_flight = self.active.clone()  # slots whose prompt's output is not collected yet
        # per prompt: the results
        self.prompts = list(prompts)  # the session's rows hold the first ones
        count = len(self.prompts)
        self.outputs: list[list[int]] = [[] for _ in range(count)]
        self.reasons = ["length"] * count
        self.eos_tokens: list[int | None] = [None] * count
        self.prompt_generators = generator
        if isinstance(generator, list):
            self.generator = generator[:batch]
        self.stats = DecodeStats(prefill_tokens=sum(session.layout.prompt_lens))
        self.check_eos = config.stop_at_eos and bool(self.eos_ids)
        self.next_prompt = batch  # the first prompt that waits for a slot
        # The next block's first refinement step, run by a fused commit: (its input, its logits,
        # the rows it is valid for: a refilled row's is not).
        self.pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.guess_logits: torch.Tensor | None = None  # [b, V] last refinement forward, last column

    def _count(self, rows: torch.Tensor) -> None:
        self.stats.row_forward_passes += int(rows.sum())

    def _suppress_mask(self, logits: torch.Tensor) -> torch.Tensor:
        # [MASK] is an input symbol, never an answer.
        return logits.index_fill(-1, self.suppressed, float("-inf"))

    def run(self) -> list[list[int]]:
        """Decode every prompt; returns each prompt's generated ids (the EOS that stopped it
        included)."""
        session, size = self.session, self.config.block_size
        forwards_before = session.runner.forward_passes
        if session.prefill() is not None:
            self._count(self.active)
        block_index = 0
        while session.cursor < session.num_columns and bool(self.active.any()):
            start = session.cursor
            block = self.prepare(start)
            self.first_token(block)
            self.refine(block)
            new_tokens = self.finish(block, start)
            per_prompt: list[list[int]] = [[] for _ in self.prompts]
            for row, tokens in enumerate(new_tokens):
                per_prompt[self.row_prompt[row]] += tokens
            if bool(self.active.any()):
                self.commit(block.tokens, start + size)
                self._count(self.active)
            else:
                session.tokens[:, start : start + size] = block.tokens
            self.collect_stopped_rows()
            self.refill()
            if self.callback is not None:
                self.callback(block_index, per_prompt)
            block_index += 1
        self.stats.forward_passes = session.runner.forward_passes - forwards_before
        return self.outputs

    def collect_stopped_rows(self) -> None:
        """Move the results of the slots whose prompt stopped to their prompt's entry."""
        for row in (self.in_flight & ~self.active).nonzero().flatten().tolist():
            prompt = self.row_prompt[row]
            self.outputs[prompt] = self.history[row]
            self.reasons[prompt], self.eos_tokens[prompt] = self.row_reasons[row], self.row_eos[row]
            self.in_flight[row] = False

    def refill(self) -> None:
        """Give the free slots the next waiting prompts, their first block the next one."""
        waiting = range(self.next_prompt, len(self.prompts))
        free = (~self.in_flight).nonzero().flatten().tolist()
        rows, ids = free[: len(waiting)], list(waiting[: len(free)])
        if not rows:
            return
        self.next_prompt += len(rows)
        config, prompts = self.config, [self.prompts[i] for i in ids]
        lengths = [min(len(p) + config.max_new_tokens, self.max_context) for p in prompts]
        self.session.refill(rows, prompts, lengths, live=self.active)
        for row, prompt in zip(rows, ids):
            self.row_prompt[row], self.history[row] = prompt, []
            self.row_reasons[row], self.row_eos[row] = "length", None
            if isinstance(self.prompt_generators, list):
                self.generator[row] = self.prompt_generators[prompt]
        refilled = torch.zeros_like(self.active)
        refilled[rows] = True
        self.active |= refilled
        self.in_flight |= refilled
        self.stats.prefill_tokens += sum(len(p) for p in prompts)
        if self.pending is not None:
            self.pending[2][rows] = False  # their fused step ran over the old prompt's columns
        forwards = self.session.runner.forward_passes
        self.session.prefill_rows(rows)
        if self.session.runner.forward_passes > forwards:
            self._count(refilled)

    def prepare(self, start: int) -> ActiveBlock:
        """The block at columns start..: generated columns masked, invalid ones padded."""
        session, size = self.session, self.config.block_size
        cols = slice(start, start + size)
        tokens = session.tokens[:, cols].clone()
        valid = session.valid[:, cols]
        offsets = torch.arange(start, start + size, device=self.device)
        generated = valid & (offsets[None, :] >= session.prompt_end[:, None])
        generated &= self.active[:, None]
        tokens[generated] = session.mask_id
        tokens[~valid] = session.pad_id
        return ActiveBlock(tokens, generated, generated.clone(), self.active.clone())

    def _stop_finished_rows(self, block: ActiveBlock) -> None:
        if self.check_eos:
            block.running &= ~finished_at_eos(
                block.tokens, block.generated & block.running[:, None], block.masked, self.eos
            )
            block.masked &= block.running[:, None]

    def first_token(self, block: ActiveBlock) -> None:
        """With token shift: the block's first token is the AR prediction of the last committed
        position."""
        if not self.config.token_shift or not bool(block.masked[:, 0].any()):
            return
        last = self._suppress_mask(self.session.last_logits)
        first, _ = propose_tokens(last, self.config.sampling, self.generator, block.masked[:, 0])
        block.tokens[:, 0] = torch.where(block.masked[:, 0], first, block.tokens[:, 0])
        block.masked[:, 0] = False
        self._stop_finished_rows(block)

    def _step_logits(self, block: ActiveBlock, reuse: int) -> torch.Tensor:
        """Raw logits of one refinement step: the fused commit's for the rows whose input it ran on
        (its guess held), a forward of the other running rows (a miss); all rows without a fused
        step."""
        pending, self.pending = self.pending, None
        if pending is None:
            logits = self.session.block_logits(block.tokens, reuse)
            self._count(block.running)
            return logits
        inputs, logits, usable = pending
        missed = block.running & usable & ~(inputs == block.tokens).all(dim=1)
        redo = missed | (block.running & ~usable)  # not usable: the row was refilled since
        if not bool(redo.any()):
            self.stats.fused_hits += 1
            return logits
        if bool(missed.any()):
            self.stats.fused_misses += 1
        rows = redo.nonzero().flatten()
        logits = logits.clone()
        logits[rows] = self.session.block_logits(block.tokens[rows], rows=rows)
        self._count(redo)
        return logits

    def refine(self, block: ActiveBlock) -> None:
        """Unmask the block, sub-block by sub-block, one refinement forward per step."""
        config, size = self.config, self.config.block_size
        sub = config.sub_block_size or size
        steps_per_unit = config.steps_per_unit
        self.guess_logits = None
        for sub_start in range(0, size, sub):
            in_sub = torch.zeros_like(block.masked)
            in_sub[:, sub_start : sub_start + sub] = True
            step = 0
            while bool((block.masked & in_sub).any()):
                # sub-block cache: the first step of a sub-block refreshes the whole block's k/v;
                # its later steps reuse those of the finished sub-blocks (with token shift the last
                # finished column is re-run: its logit predicts this sub-block's start)
                reuse = 0
                if config.sub_block_cache and step > 0:
                    reuse = max(sub_start - int(config.token_shift), 0)
                logits = self._step_logits(block, reuse)
                self.guess_logits = logits[:, -1]
                if config.token_shift:
                    # position j is predicted by the logit at j - 1 (j = 0 was filled before)
                    logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
                proposal, chosen = unmask_step(
                    self._suppress_mask(logits),
                    block.masked & in_sub,
                    config.unmasking,
                    config.sampling,
                    self.generator,
                    steps_left=None if steps_per_unit is None else steps_per_unit - step,
                )
                block.tokens = torch.where(chosen, proposal, block.tokens)
                block.masked &= ~chosen
                step += 1
                self._stop_finished_rows(block)
        self.pending = None  # a fused step that was not needed (no refinement this block)

    def finish(self, block: ActiveBlock, start: int) -> list[list[int]]:
        """Record the block's tokens; rows that produced EOS, hit their budget or were stopped by
        the caller stop here. Returns each row's new tokens."""
        session, size, batch = self.session, self.config.block_size, len(self.row_reasons)
        new_tokens: list[list[int]] = [[] for _ in range(batch)]
        hit_eos = torch.zeros_like(self.active)
        for i in self.active.nonzero().flatten().tolist():
            for j in block.generated[i].nonzero().flatten().tolist():
                token = int(block.tokens[i, j])
                new_tokens[i].append(token)
                self.stats.generated_tokens += 1
                if self.config.stop_at_eos and token in self.eos_ids:
                    self.row_reasons[i], self.row_eos[i] = "eos", token
                    hit_eos[i] = True
                    break
        if bool(hit_eos.any()):
            is_eos = torch.isin(block.tokens, self.eos) & block.generated
            first_eos = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1), size)
            session.stop_rows_after(hit_eos, start + first_eos)
        self.active &= ~hit_eos
        done_budget = self.active & (session.end <= start + size)
        for i in done_budget.nonzero().flatten().tolist():
            limit = session.layout.pads[i] + self.max_context
            self.row_reasons[i] = "context" if int(session.end[i]) >= limit else "length"
        self.active &= ~done_budget
        for i in range(batch):
            self.history[i].extend(new_tokens[i])
        if self.stop is not None:
            for i in self.active.nonzero().flatten().tolist():
                if self.stop(self.row_prompt[i], self.history[i]):
                    self.row_reasons[i] = "stop"
                    row = torch.arange(batch, device=self.device) == i
                    session.stop_rows_after(row, torch.full_like(session.end, start + size - 1))
                    self.active[i] = False
        return new_tokens

    def commit(self, tokens: torch.Tensor, next_start: int) -> None:
        """Commit the finished block; fused with the next block's first refinement step when that
        block exists and (with token shift) its first token can be guessed."""
        session, config = self.session, self.config
        fuse = config.fused_commit and next_start < session.num_columns
        if fuse and config.token_shift and self.guess_logits is None:
            fuse = False  # no refinement forward in this block: nothing to guess from
        if not fuse:
            session.commit(tokens)
            return
        upcoming = self.prepare(next_start)
        if config.token_shift:
            guess = self._suppress_mask(self.guess_logits).argmax(dim=-1)
            column = upcoming.tokens[:, 0]
            upcoming.tokens[:, 0] = torch.where(upcoming.masked[:, 0], guess, column)
        logits = session.commit_fused(tokens, upcoming.tokens)
        self.pending = (upcoming.tokens, logits, self.active.clone())
        self.stats.fused_commits += 1


def decode_batch(
    runner: Any,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    config: DecodeConfig,
    *,
    mask_id: int,
    pad_id: int,
    eos_ids: Sequence[int],
    max_context: int,
    row_ids: Sequence[int] | None = None,
    callback: Callable[[int, list[list[int]]], None] | None = None,
    stop: Callable[[int, list[int]], bool] | None = None,
    suppress_mask: bool = True,
    batch_size: int | None = None,
) -> DecodeOutput:
    """Block-decode `prompts` with `runner`'s model (what `BlockDecoder.generate`, `ARDecoder.generate`
    and the exported decoder run). `row_ids` name the prompts for the sampling seed (default
    0..b-1); `suppress_mask=False` lets `mask_id` be drawn (an AR model without [MASK]: `mask_id` is
    then only the placeholder of undecoded columns). `batch_size`: decode at most that many prompts
    at once, a slot freed by a stopped prompt taking the next one (None: all prompts in one batch);
    every prompt gets the tokens it gets alone."""
    began = time.perf_counter()
    prompts = check_prompts(prompts, max_context)
    row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
    if len(row_ids) != len(prompts):
        raise InferenceError(f"row_ids has {len(row_ids)} entries for {len(prompts)} prompts")
    if batch_size is not None:
        require_positive_int("batch_size", batch_size)
    slots = len(prompts) if batch_size is None else min(batch_size, len(prompts))
    session = new_session(
        runner, prompts[:slots], config, max_context=max_context, mask_id=mask_id, pad_id=pad_id
    )
    loop = BlockRefinement(
        session,
        config,
        eos_ids=eos_ids,
        max_context=max_context,
        generator=row_generators(config.seed, row_ids),
        callback=callback,
        stop=stop,
        suppress_mask=suppress_mask,
        prompts=prompts,
    )
    rows = loop.run()
    tokens = [row[:-1] if eos is not None else row for row, eos in zip(rows, loop.eos_tokens)]
    loop.stats.seconds = time.perf_counter() - began
    return DecodeOutput(tokens, loop.reasons, loop.stats, loop.eos_tokens)
