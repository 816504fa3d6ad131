"""The micro-batches of a training step: each sample's noise, the model inputs, the loss denominators.

For every sample, t and x_t are drawn on the CPU from generators seeded by (train.seed, step k, the
sample's index in the global batch) (`noise_micro_batch`, docs/METHOD.md §4): a resumed run replays
the same noise, all TP/PP/CP ranks of a DP rank draw the same, and the same sample is noised alike at
any DP size and micro-batch size (the run's loss curve does not depend on the layout). The loss
denominators (loss tokens, AR targets) of the global batch are summed over micro-batches and DP ranks
before the forward (`global_denominators`), so that each micro-batch's loss is its exact share of the
global loss (method/losses.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from nbdiff_megatron.method.losses import loss_token_counts
from nbdiff_megatron.method.masks import annealed_draw, document_positions, training_position_ids
from nbdiff_megatron.method.noise import (
    block_layout,
    mask_tokens,
    mask_uniforms,
    per_token_t,
    sample_t,
)
from nbdiff_megatron.model.builder import ModelInputs, ar_model_inputs, nbdiff_model_inputs
from nbdiff_megatron.training.config import TrainConfig
from nbdiff_megatron.training.setup import Batch, Components

NOISE_STREAM_SAMPLE = 0
"""`noise_seed` stream of a sample's own draws: its t (unless antithetic), token mask, annealed mask."""
NOISE_STREAM_PAIR_T = 1
"""`noise_seed` stream of the t of an antithetic pair (samples 2p and 2p + 1 of the global batch)."""


def noise_seed(seed: int, step: int, sample: int, stream: int = NOISE_STREAM_SAMPLE) -> int:
    """Seed of a noise generator: (train.seed, step k, the sample's index in the global batch, stream).

    Never the DP rank or micro-batch holding the sample: the same sample gets the same noise at any
    DP / TP / PP / CP size and micro-batch size (a requeue onto other nodes continues the same
    run). Stable across runs and platforms (numpy's SeedSequence).
    """
    state = np.random.SeedSequence([seed, step, sample, stream]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def first_sample_of(micro_batch: int, dp_rank: int, dp: int, micro_batch_size: int) -> int:
    """Index in the global batch of the first sample of a DP rank's micro-batch.

    The sampler (data/loader.py `DeterministicSampler`) deals each group of dp x micro_batch_size
    consecutive samples of the global order out in contiguous shares, rank r getting the r-th.
    """
    return (micro_batch * dp + dp_rank) * micro_batch_size


class Noise(NamedTuple):
    """The noised view of one micro-batch (all CPU tensors, [b, L])."""

    x_t: torch.Tensor
    """Token ids with the masked positions replaced by [MASK]."""
    masked: torch.Tensor
    """True where x_t holds [MASK]."""
    t: torch.Tensor
    """Per-token masking probability: the L_MDM weight of a masked token is 1 / t. It is the diffusion
    time t of the token's block (or sequence) under uniform masking and the position-dependent
    probability p_q otherwise (an unbiased eq. 5); where a token cannot be masked (p = 0: a block start
    under token shift) it holds its block's t, never read by the loss."""
    positions: torch.Tensor
    """Each token's position inside its document (blocks are counted from document starts)."""
    annealed_draw: torch.Tensor | None = None
    """mask_kind annealed: the mask's random decisions [b, L, B] (`method.masks.annealed_draw`)."""


def noise_micro_batch(
    cfg: TrainConfig,
    x0: torch.Tensor,
    doc_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    step: int,
    first_sample: int,
    block_size: int,
    mask_id: int,
) -> Noise:
    """t and x_t of one micro-batch (docs/METHOD.md §4), drawn on the CPU, sample by sample.

    Row i is the sample of index `first_sample + i` in the global batch (`first_sample_of`); its noise
    comes from generators seeded by (train.seed, step, that index) only (`noise_seed`), so a sample is
    noised alike whatever DP rank and micro-batch hold it -- the same config gives the same run at any
    layout and micro-batch size -- every TP/PP/CP rank draws the same, and a resumed run replays it;
    CPU draws make a GPU run's noise reproducible on a CPU. A per-block t is drawn for the row's own
    blocks, so a row's draws do not depend on the other rows of its micro-batch either.

    Tokens outside the loss (loss_mask False) are never masked: in SFT these are the prompt and user
    turns, which inference always sees clean, so each x_t block sees what the active block sees at
    decoding time (docs/METHOD.md §3); in pretraining they are the padding suffix, which carries no loss and
    stays clean too (a [MASK] there would only be noise in the x_t context of no loss token). The random
    draws are made for every position first, so the noise of the loss tokens does not depend on it.
    """
    x0, doc_ids, loss_mask = x0.cpu(), doc_ids.cpu(), loss_mask.cpu()
    batch, length = x0.shape
    positions = training_position_ids(length, doc_ids)[:, :length]
    progress = cfg.step_schedule().anneal_progress(step)
    # A per-block t has one column per block of the row itself (a function of the sample alone).
    blocks = (
        block_layout(batch, length, block_size=block_size, positions=positions).index[:, -1] + 1
    )
    # Only the draws are made row by row (each sample's generator: t, then the token mask's uniforms,
    # then the annealed mask); the rest is computed for the whole micro-batch at once.
    t_rows, uniform_rows, draw_rows = [], [], []
    for row in range(batch):
        sample = first_sample + row
        gen = torch.Generator(device="cpu")
        gen.manual_seed(noise_seed(cfg.train.seed, step, sample))
        n_blocks = int(blocks[row]) if cfg.noise.per_block else None
        t_rows.append(_sample_t_of(cfg, step, sample, n_blocks, length, gen))
        uniform_rows.append(mask_uniforms(1, length, generator=gen))
        if progress is not None:
            draw_rows.append(annealed_draw(1, length, block_size, progress, generator=gen))
    t = _stack_t(t_rows, cfg.noise.t_max)
    _, masked, probability = mask_tokens(
        x0,
        t,
        block_size=block_size,
        mask_id=mask_id,
        position_dependent=cfg.noise.position_dependent,
        skew=cfg.noise.skew,
        token_shift=cfg.loss.token_shift,
        positions=positions,
        return_probability=True,
        uniforms=torch.cat(uniform_rows),
    )
    masked = masked & loss_mask
    x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    t_token = per_token_t(t, seq_len=length, block_size=block_size, positions=positions)
    # Weight each masked token by 1 / its own masking probability: E[masked / p] = 1 at every position,
    # so position-dependent masking keeps L_MDM an unbiased bound (1 / t would not).
    t_token = torch.where(probability > 0, probability.to(t_token.dtype), t_token)
    draw = torch.cat(draw_rows) if draw_rows else None
    return Noise(x_t, masked, t_token, positions, draw)


def _sample_t_of(
    cfg: TrainConfig,
    step: int,
    sample: int,
    n_blocks: int | None,
    length: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """t of one sample ([1], or [1, n_blocks] per block) from its generator `gen`.

    With `noise.antithetic` the samples 2p and 2p + 1 of the global batch are a mirrored pair: both
    take their t from the pair's own generator (`NOISE_STREAM_PAIR_T`), the odd one mirrored
    (`sample_t`'s antithetic rows), whatever ranks and micro-batches hold them. Per block, the pair
    draws `length` blocks (the most a row holds) and each keeps its first n_blocks: block j of one
    mirrors block j of the other even when their documents cut them into different numbers.
    """
    noise = cfg.noise
    if not noise.antithetic:
        return sample_t(1, n_blocks=n_blocks, lo=noise.t_min, hi=noise.t_max, generator=gen)
    pair = torch.Generator(device="cpu")
    pair.manual_seed(noise_seed(cfg.train.seed, step, sample - sample % 2, NOISE_STREAM_PAIR_T))
    width = None if n_blocks is None else length
    both = sample_t(
        2, n_blocks=width, lo=noise.t_min, hi=noise.t_max, antithetic=True, generator=pair
    )
    mine = both[sample % 2 : sample % 2 + 1]
    return mine if n_blocks is None else mine[:, :n_blocks]


def _stack_t(rows: list[torch.Tensor], filler: float) -> torch.Tensor:
    """The rows' t as one [b] or [b, n_blocks] tensor: a row with fewer blocks than the widest is
    padded with `filler` (columns past its last block, which no token reads)."""
    if rows[0].dim() == 1:
        return torch.cat(rows)
    width = max(row.shape[1] for row in rows)
    return torch.cat(
        [torch.nn.functional.pad(row, (0, width - row.shape[1]), value=filler) for row in rows]
    )


@dataclass
class MicroBatch:
    """One micro-batch: the FULL [b, L] tensors (also under CP: loss targets cross CP chunks)."""

    x0: torch.Tensor
    masked: torch.Tensor
    t: torch.Tensor
    doc_ids: torch.Tensor
    loss_mask: torch.Tensor
    positions: torch.Tensor
    inputs: ModelInputs
    """The forward's inputs (this CP rank's shard when cp > 1)."""
    rows: torch.Tensor | None = None
    """Positions in the x_t ⊕ x_0 layout (0..2L-1) of the forward's output rows when it covers only
    some of them: L..2L-1 for the AR objective (an x_0-only forward). None: all 2L (or the CP
    layout's)."""


def micro_batches(
    parts: Components, batches: Iterator[Batch], step: int, block_size: int
) -> list[MicroBatch]:
    """This DP rank's micro-batches of `step`, taken from `batches` (the CP ranks of a DP rank get
    the same ones)."""
    loop = parts.cfg.train
    count = loop.global_batch_size // parts.place.dp // loop.micro_batch_size
    return [micro_batch(parts, next(batches), step, mb, block_size) for mb in range(count)]


def micro_batch(parts: Components, batch: Batch, step: int, mb: int, block_size: int) -> MicroBatch:
    """Micro-batch `mb` of this DP rank at `step`: noised (NBDiff) or x_0 alone (the AR objective)."""
    cfg, place = parts.cfg, parts.place
    if parts.objective == "ar":
        return _ar_micro_batch(parts, batch)
    noise = noise_micro_batch(
        cfg,
        batch["tokens"],
        batch["doc_ids"],
        batch["loss_mask"],
        step=step,
        first_sample=first_sample_of(mb, place.dp_rank, place.dp, cfg.train.micro_batch_size),
        block_size=block_size,
        mask_id=parts.mask_id,
    )
    device = place.device
    x0, doc_ids, loss_mask = (batch[k].to(device) for k in ("tokens", "doc_ids", "loss_mask"))
    # Multi-turn SFT samples carry turn ids (data/sft.py): no token sees past the end of its turn.
    turn_ids = batch["turn_ids"].to(device) if "turn_ids" in batch else None
    x_t, masked, t, positions = (v.to(device) for v in noise[:4])
    inputs = nbdiff_model_inputs(
        x_t,
        x0,
        block_size=block_size,
        kind=cfg.curriculum.mask_kind,
        doc_ids=doc_ids,
        backend=cfg.model.resolved_attention_backend(),
        cp_layout=parts.cp_layout,
        turn_ids=turn_ids,
        annealed_draw=noise.annealed_draw,
    )
    return MicroBatch(x0, masked, t, doc_ids, loss_mask, positions, inputs)


def _ar_micro_batch(parts: Components, batch: Batch) -> MicroBatch:
    """A micro-batch of the AR objective: a causal forward on x_0, scored as the x_0 rows of the
    x_t ⊕ x_0 layout (nothing masked), so the loss is exactly the NBDiff step's L_AR term."""
    device = parts.place.device
    x0, doc_ids, loss_mask = (batch[k].to(device) for k in ("tokens", "doc_ids", "loss_mask"))
    length = x0.shape[1]
    backend = parts.cfg.model.resolved_attention_backend()
    inputs = ar_model_inputs(x0, doc_ids=doc_ids, backend=backend)
    return MicroBatch(
        x0,
        torch.zeros_like(x0, dtype=torch.bool),
        torch.ones(x0.shape, dtype=torch.float32, device=device),
        doc_ids,
        loss_mask,
        document_positions(doc_ids.long()),
        inputs,
        rows=torch.arange(length, 2 * length, device=device),
    )


def global_denominators(
    parts: Components, mbs: list[MicroBatch]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss tokens and AR targets of the global batch: full micro-batches, summed over DP ranks only
    (the CP ranks of a DP rank hold the same micro-batches)."""
    totals = torch.zeros(2, dtype=torch.float64, device=parts.place.device)
    for mb in mbs:
        mdm, ar = loss_token_counts(mb.x0, loss_mask=mb.loss_mask, doc_ids=mb.doc_ids)
        totals[0] += mdm
        totals[1] += ar
    if dist.is_initialized() and parts.place.dp > 1:
        dist.all_reduce(totals, group=ps.get_data_parallel_group())
    return totals[0].float(), totals[1].float()
