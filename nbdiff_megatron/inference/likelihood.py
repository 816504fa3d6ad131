"""Log-likelihood of a continuation given a context under the block-diffusion model (docs/METHOD.md §4).

The causal score (lm_eval_adapter's default for AR-trained heads) reads the x_0 half; a model trained
with λ = 0 or the block-causal mask has no meaningful AR head, so its score is the block-diffusion
bound, laid out exactly as decoding lays the blocks out (BlockDecoder's session: same alignment, same
committed-block encoding, so the logits are the training forward's):

    log p(y | c) >= sum over blocks k of  E_l E_{M, |M| = l} [ (n_k / l) * sum_{i in M} log p(y_i | y_t^k, y_<k, c) ]

n_k = continuation tokens of block k still to be predicted, l ~ U{1..n_k} masked of them chosen
uniformly, the rest of the block (and the context's tail inside it) clean; committed blocks are the
clean continuation. With token shift the first token of a block is the AR prediction of the last
committed position (exact, no sampling) and the logit at i-1 predicts token i. Each sample is one
forward per block; the estimate is the mean over `samples` draws (its variance falls as 1/samples),
seeded per request (`row_generators`), so a request scores the same in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from nbdiff_megatron.inference.unmasking import row_generators


def default_loglikelihood(mask_kind: str, ar_weight: float | None) -> str:
    """ "diffusion" when the model has no trained AR head (λ = 0, or the block-causal mask), else
    "causal"."""
    if mask_kind == "block_causal" or (ar_weight is not None and float(ar_weight) == 0.0):
        return "diffusion"
    return "causal"


@torch.inference_mode()
def diffusion_loglikelihood(
    decoder: object,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    samples: int = 8,
    seed: int = 0,
    row_ids: Sequence[int] | None = None,
) -> list[tuple[float, bool]]:
    """(Monte Carlo block-diffusion bound of log p(continuation | context), is_greedy) per pair.

    `decoder` is a BlockDecoder (its config gives B, token shift, mask kind, block alignment);
    `is_greedy`: every continuation token is the argmax of its prediction when its whole block's
    continuation is masked (one forward per block).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    contexts = [list(c) for c, _ in pairs]
    conts = [list(y) for _, y in pairs]
    batch = len(pairs)
    row_ids = list(range(batch)) if row_ids is None else list(row_ids)
    gens = row_generators(seed, row_ids)
    assert gens is not None
    longest = max(len(y) for y in conts)
    if longest == 0:
        return [(0.0, True)] * batch
    config = replace(decoder.config, max_new_tokens=longest)  # type: ignore[attr-defined]
    session = decoder.start(contexts, config)  # type: ignore[attr-defined]
    device = session.tokens.device
    for i, y in enumerate(conts):
        start = int(session.prompt_end[i])
        if y:
            session.tokens[i, start : start + len(y)] = torch.tensor(y, device=device)
    # each row ends with its own continuation (the layout reserved the longest one)
    last = session.prompt_end + torch.tensor([len(y) for y in conts], device=device) - 1
    session.stop_rows_after(torch.ones(batch, dtype=torch.bool, device=device), last)
    session.tokens[~session.valid] = decoder.pad_id  # type: ignore[attr-defined]
    mask_id = decoder.mask_id  # type: ignore[attr-defined]
    block_size, shift = config.block_size, config.token_shift
    total = torch.zeros(batch, dtype=torch.float64)
    greedy = torch.ones(batch, dtype=torch.bool)
    session.prefill()
    while session.cursor < session.num_columns:
        c = session.cursor
        clean = session.tokens[:, c : c + block_size].clone()
        cols = torch.arange(c, c + block_size, device=device)
        target = session.valid[:, c : c + block_size] & (
            cols[None, :] >= session.prompt_end[:, None]
        )
        if not bool(target.any()):
            break
        if shift and bool(target[:, 0].any()):
            # the block's first token: the AR prediction of the last committed position
            logp = torch.log_softmax(decoder.mask_suppressed(session.last_logits).float(), dim=-1)  # type: ignore[attr-defined]
            first = logp.gather(-1, clean[:, :1]).squeeze(-1)
            total += torch.where(target[:, 0], first, 0.0).double().cpu()
            greedy &= (~target[:, 0] | (logp.argmax(-1) == clean[:, 0])).cpu()
            target[:, 0] = False
        n = target.sum(dim=1)
        if bool((n > 0).any()):
            all_masked = torch.where(target, mask_id, clean)
            logp = _block_logp(decoder, session, all_masked, shift)
            argmax_ok = (logp.argmax(-1) == clean) | ~target
            greedy &= argmax_ok.all(dim=1).cpu()
            estimate = torch.zeros(batch, dtype=torch.float64)
            for _ in range(samples):
                chosen = _draw_masks(target, n, gens)
                noised = torch.where(chosen, mask_id, clean)
                logp = _block_logp(decoder, session, noised, shift)
                token_logp = logp.gather(-1, clean[..., None]).squeeze(-1)
                weight = n.double() / chosen.sum(dim=1).clamp_min(1).double()
                # where, not a product: unused columns hold [MASK]/padding, whose logp is -inf
                picked = torch.where(chosen, token_logp.double(), 0.0).sum(dim=1)
                estimate += weight.cpu() * picked.cpu()
            total += estimate / samples
        if session.cursor + block_size >= session.num_columns:
            break
        session.commit(clean)
    return [(float(total[i]), bool(greedy[i])) for i in range(batch)]


def _block_logp(decoder: object, session: object, block: torch.Tensor, shift: bool) -> torch.Tensor:
    """log-probabilities [b, n, V] predicting each position of the active block."""
    logits = session.block_logits(block)  # type: ignore[attr-defined]
    if shift:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return torch.log_softmax(decoder.mask_suppressed(logits).float(), dim=-1)  # type: ignore[attr-defined]


def _draw_masks(target: torch.Tensor, n: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """Per row: l ~ U{1..n} of its target positions, chosen uniformly (nothing when n = 0)."""
    chosen = torch.zeros_like(target)
    for i, gen in enumerate(gens):
        count = int(n[i])
        if count == 0:
            continue
        positions = target[i].nonzero().flatten()
        masked = int(torch.randint(1, count + 1, (1,), generator=gen))
        pick = torch.randperm(count, generator=gen)[:masked].to(positions.device)
        chosen[i, positions[pick]] = True
    return chosen
