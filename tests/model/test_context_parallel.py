"""Context parallelism: the zigzag layout, the CP ranks' masks and inputs, the exact local loss.

Single process: a CP rank is simulated by its layout (no process group). The real CP=2 forward and
backward through megatron-core (gloo, torchrun) is `test_cp_two_ranks_match_one_rank` at the bottom.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from nbdiff_megatron.errors import ConfigError
from nbdiff_megatron.method.losses import nbdiff_loss
from nbdiff_megatron.method.masks import document_positions, training_mask, training_mask_mod
from nbdiff_megatron.method.noise import mask_tokens
from nbdiff_megatron.model.attention import (
    HAVE_FLEX,
    AttentionMask,
    BlockMaskCache,
    NBDiffAttention,
)
from nbdiff_megatron.model.builder import nbdiff_model_inputs
from nbdiff_megatron.model.context_parallel import (
    ContextParallelLayout,
    cp_local_loss,
    local_rows_mask_mod,
    shard_model_inputs,
)
from tests.launch import output_tail, run_torchrun

from .conftest import tiny_config

L, BLOCK = 16, 3  # chunk length 4 at CP=2: the block size does not divide it


def _docs() -> torch.Tensor:
    return torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 7])


def _ids(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 50, (2, L), generator=gen)
    xt = torch.where(torch.rand(2, L, generator=gen) < 0.5, torch.full_like(x0, 99), x0)
    return xt, x0


# ------------------------------------------------------------------------------- layout
def test_zigzag_layout_pairs_mirrored_chunks_in_both_halves():
    layouts = [ContextParallelLayout(L, 2, r) for r in range(2)]
    assert layouts[0].chunk_length == 4 and layouts[0].local_length == 16
    assert layouts[0].half_positions().tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert layouts[1].half_positions().tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    # x_0 holds the same chunks as x_t (offset L)
    assert layouts[1].global_positions().tolist() == [
        4,
        5,
        6,
        7,
        8,
        9,
        10,
        11,
        20,
        21,
        22,
        23,
        24,
        25,
        26,
        27,
    ]
    four = [ContextParallelLayout(L, 4, r) for r in range(4)]
    covered = torch.cat([lay.global_positions() for lay in four])
    assert sorted(covered.tolist()) == list(range(2 * L))
    # the gather order puts the rank-major all-gather back into sequence order
    assert torch.equal(covered[four[0].gather_order()], torch.arange(2 * L))
    assert torch.equal(ContextParallelLayout(L, 1, 0).gather_order(), torch.arange(2 * L))


def test_layout_and_config_state_the_divisibility_rule():
    with pytest.raises(ConfigError, match=r"divisible by 2 \* the context parallel size = 4"):
        ContextParallelLayout(18, 2, 0)
    with pytest.raises(ConfigError, match="cp_rank"):
        ContextParallelLayout(L, 2, 2)
    with pytest.raises(ConfigError, match=r"model\.seq_length=18.*2 \* the context parallel size"):
        tiny_config(seq_length=18).validate(cp=2)
    tiny_config(seq_length=16).validate(cp=2)
    tiny_config(seq_length=18).validate(cp=1)  # no CP: any length


# ------------------------------------------------------------------------------- masks and inputs
@pytest.mark.parametrize("kind", ["context_causal", "block_causal"])
def test_sharded_inputs_are_the_rows_of_the_full_inputs(kind):
    xt, x0 = _ids()
    full = nbdiff_model_inputs(xt, x0, block_size=BLOCK, kind=kind, doc_ids=_docs())
    dense = training_mask(L, BLOCK, kind, _docs())
    for rank in range(2):
        layout = ContextParallelLayout(L, 2, rank)
        rows = layout.global_positions()
        local = nbdiff_model_inputs(
            xt, x0, block_size=BLOCK, kind=kind, doc_ids=_docs(), cp_layout=layout
        )
        assert torch.equal(local.input_ids, full.input_ids[:, rows])
        assert torch.equal(local.position_ids, full.position_ids[:, rows])
        assert local.attention_mask.context_parallel
        assert torch.equal(local.attention_mask.allowed[:, 0], dense[:, rows])
        assert torch.equal(local.attention_mask.cp_gather_order, layout.gather_order())
        again = shard_model_inputs(full, layout)
        assert torch.equal(again.attention_mask.allowed, local.attention_mask.allowed)


@pytest.mark.parametrize("kind", ["context_causal", "block_causal"])
@pytest.mark.parametrize("batched_docs", [True, False])
def test_flex_local_mask_mod_equals_dense_rows(kind, batched_docs):
    from torch.nn.attention.flex_attention import create_mask

    docs = _docs() if batched_docs else _docs()[0]
    mask_mod = training_mask_mod(L, BLOCK, kind, docs)
    dense = training_mask(L, BLOCK, kind, docs)
    batch = 2 if batched_docs else 1
    for cp in (2, 4):
        for rank in range(cp):
            layout = ContextParallelLayout(L, cp, rank)
            rows = layout.global_positions()
            local = create_mask(
                local_rows_mask_mod(mask_mod, rows),
                batch,
                1,
                layout.local_length,
                2 * L,
                device="cpu",
            )
            expected = dense[..., rows, :]
            assert torch.equal(local[:, 0], expected if batched_docs else expected[None])


@pytest.mark.skipif(not HAVE_FLEX, reason="needs FlexAttention")
def test_flex_cp_shard_attends_like_dense_rows_and_is_cached():
    """The rank's BlockMask (local queries x all keys) through FlexAttention = SDPA on dense rows."""
    config = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=8,
        use_cpu_initialization=True,
    )
    attn = NBDiffAttention(config, layer_number=1).eval()
    xt, x0 = _ids(1)
    cache = BlockMaskCache()
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(2, 2, 2 * L, 8, generator=gen)  # [b, hk, 2L, d]: all keys, in sequence order
    v = torch.randn(2, 2, 2 * L, 8, generator=gen)
    for rank in range(2):
        layout = ContextParallelLayout(L, 2, rank)
        q = torch.randn(2, 4, layout.local_length, 8, generator=gen)
        flex = nbdiff_model_inputs(
            xt, x0, block_size=BLOCK, doc_ids=_docs(), backend="flex", cache=cache, cp_layout=layout
        ).attention_mask
        dense = nbdiff_model_inputs(
            xt, x0, block_size=BLOCK, doc_ids=_docs(), cp_layout=layout
        ).attention_mask
        assert flex.backend == "flex" and flex.context_parallel
        out_flex = attn._flex(q, k, v, flex.block_mask)
        out_sdpa = attn._sdpa(q, k, v, dense.allowed)
        assert (out_flex - out_sdpa).abs().max() <= 1e-5
        hits = cache.hits
        nbdiff_model_inputs(
            xt, x0, block_size=BLOCK, doc_ids=_docs(), backend="flex", cache=cache, cp_layout=layout
        )
        assert cache.hits == hits + 1  # cached per (layout, CP rank)
    assert cache.misses == 2


def test_attention_refuses_unsharded_inputs_under_cp_and_shards_without_cp():
    def module(cp: int) -> NBDiffAttention:
        config = TransformerConfig(
            num_layers=1,
            hidden_size=32,
            num_attention_heads=4,
            kv_channels=8,
            context_parallel_size=cp,
            use_cpu_initialization=True,
        )
        return NBDiffAttention(config, layer_number=1)

    q = torch.randn(2 * L, 1, 4, 8)
    full = AttentionMask.dense(training_mask(L, BLOCK))
    with pytest.raises(ValueError, match="shard of the inputs"):
        module(2)(q, q, q, full)
    layout = ContextParallelLayout(L, 2, 0)
    local = AttentionMask.dense(
        full.allowed[..., layout.global_positions(), :], cp_gather_order=layout.gather_order()
    )
    with pytest.raises(ValueError, match="context_parallel_size=1"):
        module(1)(q[:L], q[:L], q[:L], local)


# ------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("token_shift", [True, False])
@pytest.mark.parametrize("cp", [2, 4])
def test_cp_local_losses_sum_to_the_full_loss(token_shift, cp):
    gen = torch.Generator().manual_seed(7)
    vocab = 37
    x0 = torch.randint(0, vocab - 1, (2, L), generator=gen)
    docs = _docs()
    t = torch.rand(2, generator=gen) * 0.8 + 0.2
    _, masked = mask_tokens(
        x0,
        t,
        block_size=BLOCK,
        mask_id=vocab - 1,
        token_shift=token_shift,
        generator=gen,
        positions=document_positions(docs),
    )
    masked[0, 6] = True  # inside document 1's first block (never a block start)
    t_token = t[:, None].expand(2, L).contiguous()
    loss_mask = torch.ones(2, L, dtype=torch.bool)
    loss_mask[1, :3] = False
    logits = torch.randn(2, 2 * L, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    common = dict(ar_weight=0.3, token_shift=token_shift, loss_mask=loss_mask, doc_ids=docs)
    full = nbdiff_loss(logits, x0, masked, t_token, **common)
    full.total.backward()
    full_grad = logits.grad.clone()
    logits.grad = None

    totals, pieces = [], {"mdm_sum": 0, "mdm_count": 0, "ar_sum": 0, "ar_count": 0}
    for rank in range(cp):
        layout = ContextParallelLayout(L, cp, rank)
        local_logits = layout.shard(logits)
        terms = cp_local_loss(
            local_logits,
            x0,
            masked,
            t_token,
            layout,
            mdm_denominator=full.mdm_count,
            ar_denominator=full.ar_count,
            **common,
        )
        totals.append(terms.total)
        for name in pieces:
            pieces[name] = pieces[name] + getattr(terms, name)
    torch.stack(totals).sum().backward()
    assert abs(float(torch.stack(totals).sum()) - float(full.total)) <= 1e-12
    for name in pieces:
        assert abs(float(pieces[name]) - float(getattr(full, name))) <= 1e-12, name
    assert (logits.grad - full_grad).abs().max() <= 1e-12


def test_cp_local_loss_checks_shapes():
    layout = ContextParallelLayout(L, 2, 0)
    x0 = torch.zeros(1, L, dtype=torch.long)
    masked = torch.zeros(1, L, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"2L/cp"):
        cp_local_loss(torch.zeros(1, 2 * L, 5), x0, masked, torch.ones(1), layout, ar_weight=0.5)


# ------------------------------------------------------------------------------- multi-rank
SCRIPT = Path(__file__).with_name("cp_multirank_check.py")


def _launch(mode: str, nproc: int, out: Path) -> list[dict]:
    proc = run_torchrun([SCRIPT, "--mode", mode, "--out", out], nproc=nproc, timeout=240)
    results = [json.loads(path.read_text()) for path in sorted(out.glob("result_*.json"))]
    assert len(results) == nproc, output_tail(proc)
    return results


def _check(results: list[dict]) -> None:
    for result in results:
        assert result["ok"], result
        assert not result["missing_grads"]
        assert result["max_grad_diff"] <= 1e-5
    with_loss = [r for r in results if r["loss"] is not None]  # PP: the last stage only
    assert with_loss and all(r["loss_diff"] <= 1e-5 for r in with_loss)
    assert {tuple(r["local_tokens"]) for r in results} == {
        tuple(ContextParallelLayout(L, 2, r).global_positions().tolist()) for r in range(2)
    }


@pytest.mark.multirank
def test_cp_two_ranks_match_one_rank(tmp_path):
    """CP=2 (gloo): loss and gathered gradients of 1 rank within 1e-5 (packed docs, token shift)."""
    _check(_launch("cp", 2, tmp_path))


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.skipif(
    (os.cpu_count() or 1) < 4 and os.environ.get("NBDIFF_TEST_CP_4RANKS") != "1",
    reason="4 ranks: needs >= 4 cores (or NBDIFF_TEST_CP_4RANKS=1); ~25 s each on 2 cores",
)
@pytest.mark.parametrize("mode", ["tpcp", "ppcp"])
def test_cp2_with_tp2_or_pp2_four_ranks_match_one_rank(mode, tmp_path):
    """TP=2 x CP=2 and PP=2 x CP=2 (4 gloo ranks) equal 1 rank within 1e-5."""
    _check(_launch(mode, 4, tmp_path))
