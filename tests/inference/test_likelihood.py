"""The diffusion log-likelihood (the block-diffusion bound, Monte Carlo): ranks a model's own training
text above shuffled text, its variance falls with more samples, it is seeded per request."""

from __future__ import annotations

import pytest
import torch

from nbdiff_megatron.inference import BlockDecoder
from nbdiff_megatron.inference.likelihood import default_loglikelihood, diffusion_loglikelihood

B = 8
VOCAB = 48
MASK_ID = VOCAB - 1
L = 32


def scorer(model, **options):
    return BlockDecoder(model, mask_id=MASK_ID, block_size=B, token_shift=False, **options)


@pytest.mark.parametrize("block_align", ["document", "prompt"])
def test_ranks_own_training_text_above_shuffled(memorised, block_align):
    model, text = memorised
    context, continuation = text[:5], text[5:]
    perm = torch.randperm(len(continuation), generator=torch.Generator().manual_seed(1)).tolist()
    shuffled = [continuation[i] for i in perm]
    decoder = scorer(model, block_align=block_align)
    (own, own_greedy), (other, _) = diffusion_loglikelihood(
        decoder, [(context, continuation), (context, shuffled)], samples=4, seed=0
    )
    assert own > other + 10  # nats: the memorised text is far more likely
    assert own < 0 and isinstance(own_greedy, bool)


def test_variance_falls_with_samples_and_is_seeded(memorised):
    model, text = memorised
    # a half-learned pair: the memorised context, a partly shuffled continuation
    pair = (text[:5], text[5:17] + text[17:][::-1])
    decoder = scorer(model)

    def estimates(samples):
        return torch.tensor(
            [
                diffusion_loglikelihood(decoder, [pair], samples=samples, seed=s)[0][0]
                for s in range(12)
            ]
        )

    one, many = estimates(1), estimates(16)
    assert many.var() < one.var() / 4
    assert abs(float(many.mean() - one.mean())) < 3 * float(one.std()) / 12**0.5 + 1e-6
    # seeded: the same request scores the same alone and in a batch (its own row id)
    other = (text[:3], text[3:9])
    batched = diffusion_loglikelihood(decoder, [other, pair], samples=2, seed=5)
    alone = diffusion_loglikelihood(decoder, [pair], samples=2, seed=5, row_ids=[1])
    assert batched[1][0] == pytest.approx(alone[0][0], abs=1e-5)


def test_token_shift_first_token_is_the_ar_term(tiny_model):
    """With token shift and a one-token continuation per block start, the bound is exact: it equals
    the AR log-probability of that token (no masking, no sampling)."""
    from nbdiff_megatron.model.builder import ar_forward

    context = list(range(1, 9))  # one full block: the continuation starts block 1
    decoder = BlockDecoder(tiny_model, mask_id=MASK_ID, block_size=B, token_shift=True)
    ((score, _),) = diffusion_loglikelihood(decoder, [(context, [5])], samples=3, seed=0)
    with torch.no_grad():
        logits = ar_forward(tiny_model, torch.tensor([context])).float()[0, -1]
    logits[MASK_ID] = float("-inf")
    assert score == pytest.approx(float(torch.log_softmax(logits, -1)[5]), abs=1e-4)


def test_default_follows_the_checkpoint():
    assert default_loglikelihood("context_causal", 0.5) == "causal"
    assert default_loglikelihood("context_causal", None) == "causal"
    assert default_loglikelihood("context_causal", 0.0) == "diffusion"
    assert default_loglikelihood("block_causal", 0.0) == "diffusion"
