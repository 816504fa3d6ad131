"""The NBDiff model on x_t ⊕ x_0: equivalences docs/METHOD.md §3 requires, on CPU, fp32, 1 rank."""

from __future__ import annotations

import pytest
import torch

from nbdiff_megatron.model.attention import AttentionMask
from nbdiff_megatron.model.builder import (
    PositionIdsRotaryEmbedding,
    ar_forward,
    build_model,
    nbdiff_forward,
    nbdiff_model_inputs,
    prefix_block_forward,
)

from .conftest import tiny_config

L = 16
V = 100
TOL = 1e-5


@pytest.fixture(scope="module")
def model(one_rank):
    m = build_model(tiny_config(qk_layernorm=True), seed=7)
    m.eval()
    return m


def _tokens(seed: int, batch: int = 2, length: int = L) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (batch, length), generator=gen)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def test_logits_layout_and_real_vocab(model):
    x0, xt = _tokens(0), _tokens(1)
    logits = nbdiff_forward(model, xt, x0, block_size=4)
    assert logits.shape == (2, 2 * L, V)  # padded table has 128 rows; padding never returned
    hidden = nbdiff_forward(model, xt, x0, block_size=4, return_hidden=True)
    assert hidden.shape == (2, 2 * L, 64)
    weight = model.shared_embedding_or_output_weight()
    assert _max_diff(hidden @ weight[:V].T, logits) <= TOL


@torch.no_grad()
def test_block_size_one_x0_half_equals_stock_megatron_causal_forward(model, one_rank):
    """B = 1: the x_0 half equals megatron-core's own GPTModel (local spec) run causally on x_0."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    cfg = tiny_config(qk_layernorm=True)
    stock = GPTModel(
        config=cfg.to_transformer_config(),
        transformer_layer_spec=get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm"),
        vocab_size=cfg.padded_vocab_size(1),
        max_sequence_length=2 * L,
        share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
        parallel_output=False,
    )
    missing = stock.load_state_dict(model.state_dict(), strict=False)
    assert not [k for k in missing.missing_keys if not k.endswith("_extra_state")]
    stock.eval()
    x0, xt = _tokens(2), _tokens(3)
    causal = AttentionMask.dense(torch.ones(L, L, dtype=torch.bool).tril()).to_megatron()
    reference = stock(x0, torch.arange(L).expand(2, L), causal)[..., :V]
    ours = nbdiff_forward(model, xt, x0, block_size=1)
    assert _max_diff(ours[:, L:], reference) <= TOL
    assert _max_diff(ar_forward(model, x0), reference) <= TOL


@torch.no_grad()
@pytest.mark.parametrize("kind", ["context_causal", "block_causal"])
@pytest.mark.parametrize("block_size", [1, 4, 5])
def test_x_t_never_changes_x0_half(model, kind, block_size):
    x0 = _tokens(4)
    a = nbdiff_forward(model, _tokens(5), x0, block_size=block_size, kind=kind)
    b = nbdiff_forward(model, _tokens(6), x0, block_size=block_size, kind=kind)
    assert _max_diff(a[:, L:], b[:, L:]) == 0.0
    assert _max_diff(a[:, :L], b[:, :L]) > 1e-3  # the x_t half does depend on x_t


@torch.no_grad()
@pytest.mark.parametrize("block_size", [4, 5])
def test_training_inference_consistency(model, block_size):
    """Block k of x_t in the 2L forward == [x_0 blocks < k ; x_t block k] under the inference mask."""
    x0, xt = _tokens(8), _tokens(9)
    train = nbdiff_forward(model, xt, x0, block_size=block_size)
    for start in range(0, L, block_size):
        end = min(start + block_size, L)
        infer = prefix_block_forward(model, x0[:, :start], xt[:, start:end])
        assert infer.shape == (2, end - start, V)
        assert _max_diff(train[:, start:end], infer) <= TOL, f"block starting at {start}"


def _doc_ids(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])


@torch.no_grad()
@pytest.mark.parametrize("kind", ["context_causal", "block_causal"])
def test_perturbing_one_document_leaves_the_others(model, kind):
    docs = _doc_ids([5, 7, 4]).expand(2, L)
    x0, xt = _tokens(10), _tokens(11)
    base = nbdiff_forward(model, xt, x0, block_size=3, kind=kind, doc_ids=docs)
    x0b, xtb = x0.clone(), xt.clone()
    x0b[:, 5:12] = (x0b[:, 5:12] + 1) % V  # change document 1 in both views
    xtb[:, 5:12] = (xtb[:, 5:12] + 2) % V
    moved = nbdiff_forward(model, xtb, x0b, block_size=3, kind=kind, doc_ids=docs)
    others = torch.ones(L, dtype=torch.bool)
    others[5:12] = False
    both = torch.cat([others, others])
    assert _max_diff(base[:, both], moved[:, both]) == 0.0
    assert _max_diff(base[:, ~both], moved[:, ~both]) > 1e-3


@torch.no_grad()
def test_packed_batch_with_different_layouts_equals_samples_alone(model):
    """Per-sample position ids: a batch of two layouts equals each sample run alone."""
    docs = torch.stack([_doc_ids([5, 7, 4]), _doc_ids([9, 7])])
    x0, xt = _tokens(12), _tokens(13)
    batch = nbdiff_forward(model, xt, x0, block_size=4, doc_ids=docs)
    for i in range(2):
        alone = nbdiff_forward(
            model, xt[i : i + 1], x0[i : i + 1], block_size=4, doc_ids=docs[i : i + 1]
        )
        assert _max_diff(batch[i : i + 1], alone) <= TOL


@torch.no_grad()
def test_packed_document_equals_the_same_document_at_the_start(model):
    """Positions restart per document: doc 1 (at offset 5) == the same tokens placed first."""
    x0, xt = _tokens(14, batch=1), _tokens(15, batch=1)
    packed = nbdiff_forward(model, xt, x0, block_size=4, doc_ids=_doc_ids([5, 7, 4])[None])
    moved_x0 = torch.cat([x0[:, 5:12], x0[:, :5], x0[:, 12:]], dim=1)
    moved_xt = torch.cat([xt[:, 5:12], xt[:, :5], xt[:, 12:]], dim=1)
    first = nbdiff_forward(
        model, moved_xt, moved_x0, block_size=4, doc_ids=_doc_ids([7, 5, 4])[None]
    )
    assert _max_diff(packed[:, 5:12], first[:, 0:7]) <= TOL  # x_t half
    assert _max_diff(packed[:, L + 5 : L + 12], first[:, L : L + 7]) <= TOL  # x_0 half


def test_rotary_from_position_ids_matches_megatron_table(model):
    rotary = model.rotary_pos_emb
    assert isinstance(rotary, PositionIdsRotaryEmbedding)
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    reference = RotaryEmbedding.get_emb(rotary, 2 * L)
    assert torch.equal(rotary(2 * L), reference)  # no position ids -> 0..s-1, megatron's table
    rotary.position_ids = torch.arange(2 * L).expand(3, 2 * L)
    try:
        per_sample = rotary(2 * L)
    finally:
        rotary.position_ids = None
    assert per_sample.shape == (2 * L, 3, 1, reference.shape[-1])
    assert torch.equal(per_sample, reference.expand(-1, 3, -1, -1))


@torch.no_grad()
def test_both_halves_share_positions(model):
    """Position ids are 0..L-1 twice, not 0..2L-1, and RoPE actually reads them."""
    x0, xt = _tokens(16), _tokens(17)
    inputs = nbdiff_model_inputs(xt, x0, block_size=4)
    assert torch.equal(inputs.position_ids[0], torch.cat([torch.arange(L), torch.arange(L)]))
    base = model(*inputs)
    # RoPE is relative: a common offset leaves the logits unchanged, 0..2L-1 does not.
    shifted = model(inputs.input_ids, inputs.position_ids + 3, inputs.attention_mask)
    assert _max_diff(base, shifted) <= 1e-4
    wrong = model(inputs.input_ids, torch.arange(2 * L).expand(2, -1), inputs.attention_mask)
    assert _max_diff(base[:, :L], wrong[:, :L]) > 1e-3


def test_backward_gives_finite_gradients(one_rank):
    m = build_model(tiny_config(), seed=3)
    m.train()
    x0, xt = _tokens(18), _tokens(19)
    docs = torch.stack([_doc_ids([5, 7, 4]), _doc_ids([9, 7])])
    loss = nbdiff_forward(m, xt, x0, block_size=4, doc_ids=docs).float().logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
