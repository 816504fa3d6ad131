"""The pure unmasking / sampling rules of parallel decoding."""

from __future__ import annotations

import math

import pytest
import torch

from nbdiff_megatron.inference.unmasking import (
    SamplingConfig,
    UnmaskingConfig,
    entropy_scores,
    margin_scores,
    propose_tokens,
    select_unmask,
    token_distribution,
    unmask_step,
)


def logits_for(probs: list[list[list[float]]]) -> torch.Tensor:
    return torch.tensor(probs).log()


def test_threshold_unmasks_every_confident_candidate():
    scores = torch.tensor([[0.95, 0.5, 0.91, 0.99]])
    cand = torch.tensor([[True, True, True, False]])
    chosen = select_unmask(scores, cand, threshold=0.9)
    assert chosen.tolist() == [[True, False, True, False]]


def test_at_least_one_per_row_and_none_without_candidates():
    scores = torch.tensor([[0.2, 0.3, 0.1], [0.5, 0.4, 0.3]])
    cand = torch.tensor([[True, True, True], [False, False, False]])
    chosen = select_unmask(scores, cand, threshold=0.9)
    assert chosen.tolist() == [[False, True, False], [False, False, False]]


def test_ties_go_left_and_topk():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.1]])
    cand = torch.ones(1, 4, dtype=torch.bool)
    assert select_unmask(scores, cand, threshold=0.9).tolist() == [[True, False, False, False]]
    assert select_unmask(scores, cand, threshold=None, k=2).sum().item() == 2
    # k larger than the candidates: only candidates
    cand2 = torch.tensor([[False, True, False, False]])
    assert select_unmask(scores, cand2, threshold=None, k=3).tolist() == [
        [False, True, False, False]
    ]


def test_entropy_smaller_is_better():
    scores = torch.tensor([[2.0, 0.1, 0.5]])
    cand = torch.ones(1, 3, dtype=torch.bool)
    assert select_unmask(scores, cand, threshold=0.3, larger_is_better=False).tolist() == [
        [False, True, False]
    ]
    assert select_unmask(scores, cand, threshold=0.01, larger_is_better=False).tolist() == [
        [False, True, False]
    ]


def test_scores():
    probs = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    assert torch.allclose(margin_scores(probs), torch.tensor([0.5, 0.0]), atol=1e-6)
    assert torch.allclose(entropy_scores(probs)[1], torch.tensor(math.log(3)), atol=1e-6)
    assert entropy_scores(torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_unmask_step_rules():
    # position 0 confident (0.95), position 1 flat, position 2 two-way split
    probs = [[[0.95, 0.03, 0.02], [0.34, 0.33, 0.33], [0.5, 0.49, 0.01]]]
    logits = logits_for(probs)
    cand = torch.ones(1, 3, dtype=torch.bool)
    greedy = SamplingConfig()
    tokens, chosen = unmask_step(logits, cand, UnmaskingConfig("confidence", 0.9), greedy)
    assert tokens.tolist() == [[0, 0, 0]] and chosen.tolist() == [[True, False, False]]
    _, chosen = unmask_step(logits, cand, UnmaskingConfig("confidence", 0.3), greedy)
    assert chosen.tolist() == [[True, True, True]]
    _, chosen = unmask_step(logits, cand, UnmaskingConfig("margin", 0.5), greedy)
    assert chosen.tolist() == [[True, False, False]]
    _, chosen = unmask_step(logits, cand, UnmaskingConfig("entropy", 0.8), greedy)
    assert chosen.tolist() == [[True, False, True]]
    _, chosen = unmask_step(logits, cand, UnmaskingConfig("topk", k=2), greedy)
    assert chosen.tolist() == [[True, False, True]]
    # threshold 1.0: exactly one token per step (the sequential limit)
    _, chosen = unmask_step(logits, cand, UnmaskingConfig("confidence", 1.0), greedy)
    assert chosen.sum().item() == 1


def test_top_p_truncates_and_sampling_is_seeded():
    logits = torch.tensor([[0.6, 0.25, 0.1, 0.05]]).log()
    probs = token_distribution(logits, SamplingConfig(temperature=1.0, top_p=0.8))
    assert probs[0, 2:].sum().item() == 0.0
    assert torch.allclose(probs[0, :2], torch.tensor([0.6, 0.25]) / 0.85)
    sampling = SamplingConfig(temperature=1.0, top_p=0.8)
    draws = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(3)
        draws.append(propose_tokens(logits.expand(200, 4), sampling, gen)[0])
    assert torch.equal(draws[0], draws[1])
    assert set(draws[0].tolist()) == {0, 1}


def test_bad_configs_raise_value_error():
    with pytest.raises(ValueError, match="rule"):
        UnmaskingConfig(rule="random")
    with pytest.raises(ValueError, match="threshold"):
        UnmaskingConfig(threshold=1.5)
    with pytest.raises(ValueError, match="k must"):
        UnmaskingConfig(rule="topk", k=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="steps"):
        UnmaskingConfig(rule="static")
    with pytest.raises(ValueError, match="steps"):
        UnmaskingConfig(rule="dynamic", steps=0)


def test_scheduled_count_spreads_tokens_over_the_steps():
    from nbdiff_megatron.inference.unmasking import scheduled_count

    remaining, counts = torch.tensor([31]), []
    for steps_left in range(8, 0, -1):
        k = scheduled_count(remaining, steps_left)
        counts.append(int(k))
        remaining = remaining - k
    assert counts == [4, 4, 4, 4, 4, 4, 4, 3] and int(remaining) == 0
    assert scheduled_count(torch.tensor([2, 0, 9]), 4).tolist() == [1, 0, 3]


def test_static_and_dynamic_rules():
    # 1 row, 4 positions with confidences 0.95 / 0.6 / 0.7 / 0.4 on their argmax
    probs = [[[0.95, 0.05], [0.6, 0.4], [0.3, 0.7], [0.4, 0.6]]]
    logits = logits_for(probs)
    cand = torch.ones(1, 4, dtype=torch.bool)
    greedy = SamplingConfig()
    static = UnmaskingConfig("static", steps=2)
    _, chosen = unmask_step(logits, cand, static, greedy, steps_left=2)
    assert chosen.tolist() == [[True, False, True, False]]  # ceil(4 / 2) = 2 most confident
    _, chosen = unmask_step(logits, cand, static, greedy, steps_left=1)
    assert chosen.all()
    dynamic = UnmaskingConfig("dynamic", 0.65, steps=4)
    _, chosen = unmask_step(logits, cand, dynamic, greedy, steps_left=4)
    assert chosen.tolist() == [[True, False, True, False]]  # threshold beats the minimum of 1
    _, chosen = unmask_step(
        logits, cand, UnmaskingConfig("dynamic", 0.99, steps=2), greedy, steps_left=2
    )
    assert chosen.sum() == 2  # nothing passes: the schedule's minimum


def test_entropy_bounded_takes_the_cheapest_prefix():
    from nbdiff_megatron.inference.unmasking import entropy_bounded_select

    ent = torch.tensor([[0.5, 0.1, 2.0, 0.3], [3.0, 4.0, 5.0, 6.0]])
    cand = torch.tensor([[True, True, True, True], [False, True, True, True]])
    chosen = entropy_bounded_select(ent, cand, budget=0.95)
    # row 0: 0.1 + 0.3 + 0.5 = 0.9 <= 0.95; row 1: nothing fits, the most certain candidate goes
    assert chosen.tolist() == [[True, True, False, True], [False, True, False, False]]


def test_per_row_generators_draw_independently_of_the_batch():
    from nbdiff_megatron.inference.unmasking import row_generators

    logits = torch.zeros(3, 5, 10)
    sampling = SamplingConfig(temperature=1.0)
    batch, _ = propose_tokens(logits, sampling, row_generators(4, [0, 1, 2]))
    alone, _ = propose_tokens(logits[2:], sampling, row_generators(4, [2]))
    assert torch.equal(batch[2], alone[0])
    # a row that does not draw consumes nothing from its generator
    gens = row_generators(4, [0, 1])
    propose_tokens(logits[:2], sampling, gens, rows=torch.tensor([True, False]))
    later, _ = propose_tokens(logits[1:2], sampling, gens[1:])
    first, _ = propose_tokens(logits[1:2], sampling, row_generators(4, [1]))
    assert torch.equal(later, first)
