"""Pure rules of parallel decoding: how a token is drawn from logits and which masked tokens to unmask.

docs/METHOD.md §7: inside the active block, every still-masked position gets a proposal (greedy or sampled)
and a score; the positions that pass the rule are unmasked together, at least one per step (the
best-scored one), so a block of n tokens never takes more than n steps.

Rules (`rule`, and what `threshold` / `steps` mean for it), each defined in `unmask_step` only:
- "confidence": probability of the proposed token; unmask where it is > threshold (default 0.9).
- "margin": top-1 minus top-2 probability; unmask where it is > threshold.
- "entropy": entropy (nats) of the predicted distribution; unmask where it is < threshold.
- "topk": unmask the `k` best-confidence positions per step (threshold unused).
- "static" (SDAR's low_confidence_static): a fixed number of `steps` per block; each step unmasks
  ceil(remaining / steps left) positions by confidence, so a block of n masked tokens takes exactly
  min(n, steps) steps.
- "dynamic" (SDAR's low_confidence_dynamic): confidence > threshold, but at least the "static" count
  of the step (the per-step minimum), so it never takes more than `steps` steps.
- "entropy_bounded" (EB-sampler, SDAR's entropy_bounded): order the masked positions by entropy and
  unmask the longest prefix whose summed entropy stays <= threshold (nats), at least one.

Sampling draws from softmax(logits / T) truncated to the top_k tokens and then to the top_p mass.
A list of generators (one per row) makes draws reproducible whatever the batch: a row's draws come
from its own generator only, and rows that have nothing to draw consume nothing.

No megatron import here; every function works on plain tensors and is deterministic given a generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

UNMASKING_RULES = (
    "confidence",
    "margin",
    "entropy",
    "topk",
    "static",
    "dynamic",
    "entropy_bounded",
)
# Rules whose per-step count follows a fixed number of steps per block.
SCHEDULED_RULES = ("static", "dynamic")

Generators = torch.Generator | Sequence[torch.Generator | None] | None


@dataclass(frozen=True)
class SamplingConfig:
    """How a token is drawn from a distribution (shared by block and AR decoding)."""

    temperature: float = 0.0
    """0 = greedy (argmax); > 0 divides the logits before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = all)."""
    top_k: int = 0
    """Keep only the top_k most likely tokens before sampling (0 = all)."""

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(
                f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = all tokens), got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        """True when tokens are chosen by argmax."""
        return self.temperature == 0


@dataclass(frozen=True)
class UnmaskingConfig:
    """Which masked positions of the active block are committed at a refinement step."""

    rule: str = "confidence"
    """One of UNMASKING_RULES (see the module docstring)."""
    threshold: float = 0.9
    """confidence / margin / dynamic: unmask where the score is > threshold; entropy: where it is <
    threshold; entropy_bounded: the entropy budget (nats) of one step."""
    k: int = 1
    """"topk" rule: positions unmasked per step."""
    steps: int | None = None
    """"static" / "dynamic": refinement steps per block (the per-step count is remaining / steps left)."""

    def __post_init__(self) -> None:
        if self.rule not in UNMASKING_RULES:
            raise ValueError(f"rule must be one of {', '.join(UNMASKING_RULES)}, got {self.rule!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ValueError(f"threshold must be a number, got {self.threshold!r}")
        if self.rule in ("confidence", "margin", "dynamic") and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(
                f"threshold of the {self.rule!r} rule is a probability in [0, 1], got {self.threshold}"
            )
        if self.rule in ("entropy", "entropy_bounded") and self.threshold < 0:
            raise ValueError(
                f"threshold of the {self.rule!r} rule is in nats, >= 0; got {self.threshold}"
            )
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k!r}")
        if self.rule in SCHEDULED_RULES and self.steps is None:
            raise ValueError(f"the {self.rule!r} rule needs steps (--steps-per-block)")
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise ValueError(
                f"steps (--steps-per-block) must be an integer >= 1, got {self.steps!r}"
            )


def token_distribution(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Probabilities [..., V] the proposal is drawn from: softmax(logits / T), top-k then top-p
    truncated.

    Greedy decoding (T = 0) scores tokens with the plain softmax (T = 1), as Fast-dLLM does.
    """
    logits = logits.float()
    if not sampling.greedy:
        logits = logits / sampling.temperature
        if 0 < sampling.top_k < logits.shape[-1]:
            kth = logits.topk(sampling.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.greedy or sampling.top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # Keep a token while the mass of the better ones is still below top_p (the best one always stays).
    keep_sorted = mass_before < sampling.top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    probs = probs * keep
    return probs / probs.sum(dim=-1, keepdim=True)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One multinomial draw per row of probs [n, V] -> [n]."""
    # Sample on the CPU generator's device so a seeded generator reproduces across devices.
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)[:, 0]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def propose_tokens(
    logits: torch.Tensor,
    sampling: SamplingConfig,
    generator: Generators = None,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per position: (tokens [...], probs [..., V]) from logits [..., V].

    `generator`: one generator for the whole tensor, or a list with one per row (dim 0) -- then row i
    draws from generator[i] only, and `rows` (bool [b]) limits drawing to the rows that need a
    token (the others get the argmax and consume no random numbers).
    """
    probs = token_distribution(logits, sampling)
    if sampling.greedy:
        return probs.argmax(dim=-1), probs
    if generator is None or isinstance(generator, torch.Generator):
        flat = probs.reshape(-1, probs.shape[-1])
        return _draw(flat, generator).reshape(probs.shape[:-1]), probs
    if len(generator) != probs.shape[0]:
        raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows")
    tokens = probs.argmax(dim=-1)
    for i, gen in enumerate(generator):
        if rows is not None and not bool(rows[i]):
            continue
        row = probs[i].reshape(-1, probs.shape[-1])
        tokens[i] = _draw(row, gen).reshape(probs.shape[1:-1])
    return tokens, probs


def row_generators(seed: int | None, row_ids: Sequence[int]) -> list[torch.Generator] | None:
    """One CPU generator per row, seeded from (seed, row id): a prompt's samples do not depend on the
    other prompts of its batch (None without a seed: torch's global RNG)."""
    if seed is None:
        return None
    gens = []
    for row_id in row_ids:
        gen = torch.Generator(device="cpu")
        # Distinct, reproducible streams per (seed, row); 2**31 - 1 is prime, so rows never collide.
        gen.manual_seed((int(seed) * (2**31 - 1) + int(row_id)) % (2**63 - 1))
        gens.append(gen)
    return gens


def scheduled_count(remaining: torch.Tensor, steps_left: int) -> torch.Tensor:
    """Tokens to unmask this step when `steps_left` steps (this one included) remain: ceil(n / s).

    Spreads n masked tokens evenly over the steps (the larger counts first), at least one per step
    while any remain, and never more steps than planned.
    """
    steps_left = max(int(steps_left), 1)
    return torch.div(remaining + steps_left - 1, steps_left, rounding_mode="floor")


def confidence_scores(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Probability of each proposed token: [...]."""
    return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def margin_scores(probs: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 probability: [...] (1 for a one-token vocabulary)."""
    if probs.shape[-1] < 2:
        return torch.ones(probs.shape[:-1], dtype=probs.dtype, device=probs.device)
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def entropy_scores(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each distribution: [...]."""
    logp = torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
    return -(probs * logp).sum(dim=-1)


def select_unmask(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    *,
    threshold: float | None,
    larger_is_better: bool = True,
    k: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Positions to unmask this step: BoolTensor like `candidates` ([b, n]).

    Per row: the candidates whose score passes `threshold` (> when larger is better, < otherwise),
    or, with `k` (an int, or a LongTensor [b] per row), the k best candidates; with both, the union
    (threshold with a per-step minimum of k); always at least one (the best) while the row has
    candidates. Rows without candidates unmask nothing. Ties among equal scores go to the leftmost
    position.
    """
    if scores.shape != candidates.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)} and candidates {tuple(candidates.shape)} must have equal shapes"
        )
    if threshold is None and k is None:
        raise ValueError("select_unmask needs a threshold, a k, or both")
    candidates = candidates.bool()
    signed = scores.float() if larger_is_better else -scores.float()
    ranked = signed.masked_fill(~candidates, float("-inf"))
    # argmax returns the first maximum, so ties resolve to the leftmost position.
    best = ranked.argmax(dim=-1, keepdim=True)
    chosen = torch.zeros_like(candidates).scatter(-1, best, True)
    if threshold is not None:
        chosen |= (scores > threshold) if larger_is_better else (scores < threshold)
    if k is not None:
        if isinstance(k, int) and k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        # rank of each position in descending score order (stable: ties go left)
        order = ranked.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(
            -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
        )
        k_rows = torch.as_tensor(k, device=rank.device).reshape(-1, 1)
        chosen |= rank < k_rows
    return chosen & candidates


def entropy_bounded_select(
    entropy: torch.Tensor, candidates: torch.Tensor, budget: float
) -> torch.Tensor:
    """EB-sampler: the lowest-entropy candidates whose summed entropy stays <= budget, at least one."""
    candidates = candidates.bool()
    ent = entropy.float().masked_fill(~candidates, float("inf"))
    ordered, order = ent.sort(dim=-1, stable=True)
    keep = ordered.cumsum(dim=-1) <= budget
    keep[..., 0] = True  # the most certain candidate always goes
    return torch.zeros_like(candidates).scatter(-1, order, keep) & candidates


def unmask_step(
    logits: torch.Tensor,
    candidates: torch.Tensor,
    unmasking: UnmaskingConfig,
    sampling: SamplingConfig,
    generator: Generators = None,
    *,
    steps_left: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One refinement step over a block: (tokens [b, n], unmask [b, n]).

    `logits` [b, n, V] are the predictions for the block's positions (already shifted when token shift
    is on); `candidates` marks the still-masked positions allowed to be unmasked now; `steps_left`
    (scheduled rules) counts the steps left for them, this one included.
    """
    rows = candidates.any(dim=-1)
    tokens, probs = propose_tokens(logits, sampling, generator, rows)
    rule = unmasking.rule
    if rule in SCHEDULED_RULES:
        if steps_left is None:
            raise ValueError(f"the {rule!r} rule needs steps_left")
        count = scheduled_count(candidates.sum(dim=-1), steps_left)
        threshold = unmasking.threshold if rule == "dynamic" else None
        chosen = select_unmask(
            confidence_scores(probs, tokens), candidates, threshold=threshold, k=count
        )
    elif rule == "topk":
        chosen = select_unmask(
            confidence_scores(probs, tokens), candidates, threshold=None, k=unmasking.k
        )
    elif rule == "confidence":
        chosen = select_unmask(
            confidence_scores(probs, tokens), candidates, threshold=unmasking.threshold
        )
    elif rule == "margin":
        chosen = select_unmask(margin_scores(probs), candidates, threshold=unmasking.threshold)
    elif rule == "entropy":
        chosen = select_unmask(
            entropy_scores(probs), candidates, threshold=unmasking.threshold, larger_is_better=False
        )
    else:  # entropy_bounded
        chosen = entropy_bounded_select(entropy_scores(probs), candidates, unmasking.threshold)
    return tokens, chosen
