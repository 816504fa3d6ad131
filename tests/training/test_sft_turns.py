"""Multi-turn SFT: no masked response token depends on anything after the end of its own turn.

Perturbation proof on the bundled chat set (issue 11, item 2): change every token after the end of
turn k of each conversation -- in x_0 and, consistently, in x_t (masked positions stay [MASK]) --
and the logits of every row of turns <= k (x_t rows, which predict the masked response tokens, and
x_0 rows) do not move, at B = 8 and 32, packed and one conversation per row, through the training
path (`noise_micro_batch`, `nbdiff_model_inputs`, the model). Without turn ids the same perturbation
moves the logits of masked response tokens (the leak the turn ids close).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nbdiff_megatron.data.bundled import bundled_chat_path, bundled_tokenizer_dir
from nbdiff_megatron.data.config import DEFAULT_SFT_TEMPLATE
from nbdiff_megatron.data.sft import (
    ChatFormatter,
    SFTStats,
    load_conversations,
    pack_conversations,
    tokenize_conversations,
    turn_ids_from_loss_mask,
)
from nbdiff_megatron.data.tokenizer import load_tokenizer
from nbdiff_megatron.training.batches import noise_micro_batch
from nbdiff_megatron.training.config import load_config

from .runs import TINY

L = 256


def test_turn_ids_count_the_responses_ended_before_each_token() -> None:
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1, 1, 1], dtype=bool)
    assert turn_ids_from_loss_mask(mask).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert turn_ids_from_loss_mask(np.array([1, 0, 1], dtype=bool)).tolist() == [0, 1, 1]


@pytest.fixture(scope="module")
def chats():
    tok = load_tokenizer("HuggingFaceTokenizer", bundled_tokenizer_dir())
    stats = SFTStats()
    conversations = load_conversations([bundled_chat_path()], stats)
    items = tokenize_conversations(
        conversations, ChatFormatter(tok, DEFAULT_SFT_TEMPLATE), L, "drop", stats
    )
    multi = [it for it in items if turn_ids_from_loss_mask(it[1])[-1] >= 1]
    assert len(multi) >= 20, "the bundled chat set has multi-turn conversations"
    packed = pack_conversations(multi, L, tok.pad)
    single = [pack_conversations([it], L, tok.pad) for it in multi]
    unpacked = {k: torch.cat([s[k] for s in single]) for k in packed}
    return tok, {"packed": packed, "unpacked": unpacked}


@pytest.fixture(scope="module")
def model(one_rank, chats):
    from nbdiff_megatron.model.builder import build_model
    from nbdiff_megatron.model.config import ModelConfig

    tok = chats[0]
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=tok.vocab_size,
        seq_length=L,
        attention_backend="sdpa",
    )
    return build_model(cfg, block_size=32, seed=3).eval()


def _logits(model, x_t, x0, batch, block_size, with_turns):
    from nbdiff_megatron.model.builder import nbdiff_model_inputs

    inputs = nbdiff_model_inputs(
        x_t,
        x0,
        block_size=block_size,
        doc_ids=batch["doc_ids"],
        turn_ids=batch["turn_ids"] if with_turns else None,
    )
    with torch.no_grad():
        return model(*inputs)


@pytest.mark.parametrize("layout", ["packed", "unpacked"])
@pytest.mark.parametrize("block_size", [8, 32])
def test_masked_response_tokens_never_see_past_their_turn(chats, model, layout, block_size):
    tok, data = chats
    batch = {k: v[:12] for k, v in data[layout].items()}  # the test's cost: a few forwards
    x0, doc_ids, loss_mask, turns = (
        batch[k] for k in ("tokens", "doc_ids", "loss_mask", "turn_ids")
    )
    cfg = load_config(TINY, ["--noise.t_min=0.6", "--noise.t_max=1.0"])
    noise = noise_micro_batch(
        cfg,
        x0,
        doc_ids,
        loss_mask,
        step=1,
        first_sample=0,
        block_size=block_size,
        mask_id=tok.mask_id,
    )
    masked = noise.masked
    gen = torch.Generator().manual_seed(block_size)
    checked = leaked = 0
    for k in range(int(turns.max())):
        later = turns > k
        # Every token after the end of turn k changes, in x_0 and consistently in x_t (ordinary
        # text ids, never [MASK]).
        other = torch.randint(200, 2000, x0.shape, generator=gen)
        other = torch.where(other == x0, other + 1, other)
        x0_new = torch.where(later, other, x0)
        x_t_new = torch.where(masked, torch.full_like(x0, tok.mask_id), x0_new)
        rows = (turns <= k).repeat(1, 2)  # rows of turns <= k, in x_t and in x_0
        before = _logits(model, noise.x_t, x0, batch, block_size, True)
        after = _logits(model, x_t_new, x0_new, batch, block_size, True)
        assert torch.allclose(before[rows], after[rows], atol=1e-5, rtol=0), (layout, block_size, k)
        # The predictions of turn k's masked response tokens are among the rows checked (token
        # shift: the x_t row before a masked token predicts it; it lies in the same turn).
        scored = masked & (turns == k)
        checked += int(scored.sum())
        # Without turn ids the same change reaches masked response tokens of turn k.
        old_before = _logits(model, noise.x_t, x0, batch, block_size, False)
        old_after = _logits(model, x_t_new, x0_new, batch, block_size, False)
        moved = (old_before[:, :L] - old_after[:, :L]).abs().amax(-1) > 1e-4
        shifted = torch.zeros_like(scored)
        shifted[:, :-1] = scored[:, 1:]  # row i - 1 predicts masked token i
        leaked += int((moved & shifted).sum())
    assert checked > 50
    assert leaked > 0, "the perturbation must reach masked tokens when turns are ignored"
