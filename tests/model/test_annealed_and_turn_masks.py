"""The annealed mask (mask_kind: annealed) and multi-turn turn ids in every mask form: dense, the
FlexAttention mask_mod, the context-parallel shards (issue 11, items 2 and 3)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from nbdiff_megatron.method.curriculum import Curriculum
from nbdiff_megatron.method.masks import (
    annealed_draw,
    annealed_training_mask,
    training_mask,
    training_mask_mod,
)
from nbdiff_megatron.model.builder import nbdiff_model_inputs
from nbdiff_megatron.model.context_parallel import ContextParallelLayout, local_rows_mask_mod

L, BLOCK = 16, 4


def _docs() -> torch.Tensor:
    return torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 7])


def _turns() -> torch.Tensor:
    # Non-decreasing inside each document; the second document of row 0 has two turn ends.
    return torch.tensor(
        [
            [0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 2, 2, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1],
        ]
    )


def _draw(progress: float = 0.5, seed: int = 0) -> torch.Tensor:
    return annealed_draw(2, L, BLOCK, progress, generator=torch.Generator().manual_seed(seed))


CASES = {
    "context_causal+turns": dict(kind="context_causal", turn_ids=_turns()),
    "block_causal+turns": dict(kind="block_causal", turn_ids=_turns()),
    "annealed": dict(kind="annealed", annealed_draw=_draw()),
    "annealed+turns": dict(kind="annealed", turn_ids=_turns(), annealed_draw=_draw(0.3, 1)),
}


def test_turn_ids_hide_later_turns_by_hand():
    # L = 8, one block of 8, turn ends after position 3: rows of turn 0 see nothing of turn 1.
    turns = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    for kind in ("context_causal", "block_causal"):
        m = training_mask(8, 8, kind, turn_ids=turns)
        plain = training_mask(8, 8, kind)
        assert not m[:4, 4:8].any() and not m[:4, 12:].any() and not m[8:12, 12:].any()
        assert torch.equal(m[4:8], plain[4:8]) and torch.equal(m[12:], plain[12:])
        assert plain[2, 6]  # what the turn ids remove: the bidirectional block reached turn 1
    # Context-causal x_0 rows are causal anyway: turn ids change nothing there.
    assert torch.equal(training_mask(8, 8, turn_ids=turns)[8:], training_mask(8, 8)[8:])


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("batched_docs", [True, False])
def test_mask_mod_equals_dense(case, batched_docs):
    kwargs = CASES[case]
    docs = _docs() if batched_docs else _docs()[0]
    dense = training_mask(L, BLOCK, doc_ids=docs, **kwargs)
    mod = training_mask_mod(L, BLOCK, doc_ids=docs, **kwargs)
    got = create_mask(mod, 2, 1, 2 * L, 2 * L, device="cpu")[:, 0]
    assert torch.equal(got, dense.expand(2, -1, -1))
    # and every CP rank's rows (cp 2 and 4) of the flex form equal the dense rows
    for cp in (2, 4):
        for rank in range(cp):
            rows = ContextParallelLayout(L, cp, rank).global_positions()
            local = create_mask(
                local_rows_mask_mod(mod, rows), 2, 1, len(rows), 2 * L, device="cpu"
            )[:, 0]
            assert torch.equal(local, dense.expand(2, -1, -1)[:, rows])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cp_shards_are_the_rows_of_the_full_mask(case):
    kwargs = CASES[case]
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 50, (2, L), generator=gen)
    xt = torch.where(torch.rand(2, L, generator=gen) < 0.5, torch.full_like(x0, 99), x0)
    dense = training_mask(L, BLOCK, doc_ids=_docs(), **kwargs)
    full = nbdiff_model_inputs(xt, x0, block_size=BLOCK, doc_ids=_docs(), **kwargs)
    assert torch.equal(full.attention_mask.allowed[:, 0], dense)
    for rank in range(2):
        layout = ContextParallelLayout(L, 2, rank)
        local = nbdiff_model_inputs(
            xt, x0, block_size=BLOCK, doc_ids=_docs(), cp_layout=layout, **kwargs
        )
        assert torch.equal(local.attention_mask.allowed[:, 0], dense[:, layout.global_positions()])


@pytest.mark.parametrize("batched_docs", [True, False])
def test_annealed_kind_endpoints_and_equals_annealed_training_mask(batched_docs):
    docs = _docs() if batched_docs else None
    none = torch.zeros(2, L, BLOCK, dtype=torch.bool)
    every = torch.ones(2, L, BLOCK, dtype=torch.bool)
    got0 = training_mask(L, BLOCK, "annealed", docs, annealed_draw=none)
    got1 = training_mask(L, BLOCK, "annealed", docs, annealed_draw=every)
    assert torch.equal(got0, training_mask(L, 1, doc_ids=docs).expand_as(got0))
    assert torch.equal(got1, training_mask(L, BLOCK, doc_ids=docs).expand_as(got1))
    # The training kind is annealed_training_mask over the context-causal mask with a given draw.
    doc = _docs()[0]
    draw = annealed_draw(1, L, BLOCK, 0.4, generator=torch.Generator().manual_seed(5))
    ref = annealed_training_mask(
        L, BLOCK, 0.4, generator=torch.Generator().manual_seed(5), doc_ids=doc
    )
    assert torch.equal(training_mask(L, BLOCK, "annealed", doc, annealed_draw=draw[0]), ref)


def test_annealed_kind_needs_its_draw():
    with pytest.raises(ValueError, match="annealed_draw"):
        training_mask(L, BLOCK, "annealed")
    with pytest.raises(ValueError, match="annealed_draw must have shape"):
        training_mask(L, BLOCK, "annealed", annealed_draw=torch.zeros(L, 3, dtype=torch.bool))


def test_annealed_progress_follows_the_growth_phase():
    cur = Curriculum(target=32, interval=500)  # B reaches 32 at step 2500
    assert cur.anneal_progress(1) == 0.0
    assert cur.anneal_progress(1250) == pytest.approx(1249 / 2499)
    assert cur.anneal_progress(2500) == 1.0 and cur.anneal_progress(4000) == 1.0
    assert cur.block_size(2500) == 32 and cur.block_size(2499) == 16
    assert Curriculum(target=8, start=8).anneal_progress(1) == 1.0  # no growth: the target mask


@pytest.mark.parametrize("case", ["annealed+turns", "block_causal+turns"])
def test_model_flex_equals_sdpa_with_annealed_and_turn_masks(one_rank, case):
    """The model's forward with the FlexAttention form (eager on CPU) equals the dense SDPA form."""
    from nbdiff_megatron.model.builder import build_model

    from .conftest import tiny_config

    model = build_model(tiny_config(), seed=11).eval()
    gen = torch.Generator().manual_seed(5)
    x0, xt = (torch.randint(0, 100, (2, L), generator=gen) for _ in range(2))
    kwargs = CASES[case]
    with torch.no_grad():
        dense = model(*nbdiff_model_inputs(xt, x0, block_size=BLOCK, doc_ids=_docs(), **kwargs))
        flex = model(
            *nbdiff_model_inputs(
                xt, x0, block_size=BLOCK, doc_ids=_docs(), backend="flex", cache=None, **kwargs
            )
        )
    assert (flex - dense).abs().max() <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_annealed_flex_forward_backward_matches_sdpa_cuda(one_rank):
    """Compiled FlexAttention with the annealed + turn-id mask_mod, forward and backward."""
    from nbdiff_megatron.model.builder import build_model

    from .conftest import tiny_config

    model = build_model(tiny_config(attention_backend="flex"), seed=11)
    x0 = torch.randint(0, 100, (2, L), device="cuda")
    xt = torch.randint(0, 100, (2, L), device="cuda")
    kwargs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in CASES["annealed+turns"].items()}
    grads = {}
    outs = {}
    for backend in ("sdpa", "flex"):
        model.zero_grad()
        inputs = nbdiff_model_inputs(
            xt,
            x0,
            block_size=BLOCK,
            doc_ids=_docs().cuda(),
            backend=backend,
            cache=None,
            **kwargs,
        )
        out = model(*inputs)
        out.float().pow(2).mean().backward()
        outs[backend] = out.detach().float()
        grads[backend] = [p.grad.detach().float().clone() for p in model.parameters()]
    assert (outs["flex"] - outs["sdpa"]).abs().max() <= 2e-2
    for gf, gs in zip(grads["flex"], grads["sdpa"]):
        assert (gf - gs).abs().max() <= 5e-2 * max(1.0, gs.abs().max().item())
