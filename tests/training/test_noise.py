"""The noise of a micro-batch: seeded by (seed, step, DP rank, micro-batch) only, drawn on the CPU,
never masking tokens outside the loss (SFT prompts, padding)."""

from __future__ import annotations

import torch

from nbdiff_megatron.method.noise import block_layout
from nbdiff_megatron.training.config import load_config
from nbdiff_megatron.training.loop import noise_micro_batch

from .runs import TINY

VOCAB, MASK_ID, L, BLOCK = 50, 50, 16, 4


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x0 = torch.randint(0, VOCAB, (3, L), generator=torch.Generator().manual_seed(0))
    doc_ids = torch.tensor([[0] * L, [0] * 9 + [1] * 7, [0] * 13 + [1] * 3])
    loss_mask = torch.ones(3, L, dtype=torch.bool)
    loss_mask[0, :6] = False  # an SFT prompt
    loss_mask[1, 9:12] = False  # a user turn of the second conversation
    loss_mask[2, 13:] = False  # padding (one more document)
    return x0, doc_ids, loss_mask


def _noise(cfg, x0, doc_ids, loss_mask, step=3, dp_rank=1, micro_batch=2):
    return noise_micro_batch(
        cfg,
        x0,
        doc_ids,
        loss_mask,
        step=step,
        dp_rank=dp_rank,
        micro_batch=micro_batch,
        block_size=BLOCK,
        mask_id=MASK_ID,
    )


def test_tokens_outside_the_loss_are_never_masked() -> None:
    x0, doc_ids, loss_mask = _batch()
    # t = 1: every maskable token is masked (token shift keeps each block's first token).
    cfg = load_config(TINY, ["--noise.t_min=1.0", "--noise.t_max=1.0"])
    noise = _noise(cfg, x0, doc_ids, loss_mask)
    assert not noise.masked[~loss_mask].any()
    assert torch.equal(noise.x_t[~loss_mask], x0[~loss_mask])
    starts = block_layout(3, L, block_size=BLOCK, positions=noise.positions).is_start
    assert noise.masked[loss_mask & ~starts].all()
    assert torch.equal(noise.x_t[noise.masked], torch.full_like(x0, MASK_ID)[noise.masked])
    # The draws do not depend on the loss mask: the loss tokens are noised as without it.
    cfg = load_config(TINY, ["--noise.position_dependent=true", "--noise.skew=0.8"])
    free = _noise(cfg, x0, doc_ids, torch.ones_like(loss_mask))
    noise = _noise(cfg, x0, doc_ids, loss_mask)
    assert torch.equal(noise.masked, free.masked & loss_mask)
    assert torch.equal(noise.t, free.t)


def test_noise_is_a_function_of_seed_step_dp_rank_and_micro_batch() -> None:
    x0, doc_ids, loss_mask = _batch()
    cfg = load_config(TINY, [])
    first = _noise(cfg, x0, doc_ids, loss_mask)
    again = _noise(cfg, x0, doc_ids, loss_mask)
    for a, b in zip(first, again):
        assert a.device.type == "cpu" and torch.equal(a, b)
    for other in (dict(step=4), dict(dp_rank=0), dict(micro_batch=1)):
        changed = _noise(cfg, x0, doc_ids, loss_mask, **other)
        assert not torch.equal(changed.t, first.t), other
    reseeded = _noise(load_config(TINY, ["--train.seed=7"]), x0, doc_ids, loss_mask)
    assert not torch.equal(reseeded.t, first.t)
