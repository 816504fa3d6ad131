"""Pure rules of parallel decoding: how a token is drawn from logits and which masked tokens to unmask.

NBDIFF.md §7: inside the active block, every still-masked position gets a proposal (greedy or sampled)
and a score; the positions whose score passes the rule's threshold are unmasked together, at least one
per step (the best-scored one), so a block of n tokens never takes more than n steps.

Rules (`rule`, and what `threshold` means for it):
- "confidence": probability of the proposed token; unmask where it is > threshold (default 0.9).
- "margin": top-1 minus top-2 probability; unmask where it is > threshold.
- "entropy": entropy (nats) of the predicted distribution; unmask where it is < threshold.
- "topk": unmask the `k` best-confidence positions per step (threshold unused).

No megatron import here; every function works on plain tensors and is deterministic given a generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNMASKING_RULES = ("confidence", "margin", "entropy", "topk")


@dataclass(frozen=True)
class SamplingConfig:
    """How a token is drawn from a distribution (shared by block and AR decoding)."""

    temperature: float = 0.0
    """0 = greedy (argmax); > 0 divides the logits before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = all)."""

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(
                f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        """True when tokens are chosen by argmax."""
        return self.temperature == 0


@dataclass(frozen=True)
class UnmaskingConfig:
    """Which masked positions of the active block are committed at a refinement step."""

    rule: str = "confidence"
    """One of "confidence", "margin", "entropy", "topk"."""
    threshold: float = 0.9
    """confidence / margin: unmask where the score is > threshold; entropy: where it is < threshold."""
    k: int = 1
    """"topk" rule: positions unmasked per step."""

    def __post_init__(self) -> None:
        if self.rule not in UNMASKING_RULES:
            raise ValueError(f"rule must be one of {', '.join(UNMASKING_RULES)}, got {self.rule!r}")
        if not isinstance(self.threshold, (int, float)):
            raise ValueError(f"threshold must be a number, got {self.threshold!r}")
        if self.rule in ("confidence", "margin") and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(
                f"threshold of the {self.rule!r} rule is a probability in [0, 1], got {self.threshold}"
            )
        if self.rule == "entropy" and self.threshold < 0:
            raise ValueError(
                f"threshold of the 'entropy' rule is in nats, >= 0; got {self.threshold}"
            )
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k!r}")


def token_distribution(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Probabilities [..., V] the proposal is drawn from: softmax(logits / T), top-p truncated.

    Greedy decoding (T = 0) scores tokens with the plain softmax (T = 1), as Fast-dLLM does.
    """
    logits = logits.float()
    if not sampling.greedy:
        logits = logits / sampling.temperature
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


def propose_tokens(
    logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per position: (tokens [...], probs [..., V]) from logits [..., V]."""
    probs = token_distribution(logits, sampling)
    if sampling.greedy:
        return probs.argmax(dim=-1), probs
    flat = probs.reshape(-1, probs.shape[-1])
    # Sample on the CPU generator's device so a seeded generator reproduces across devices.
    if generator is not None and generator.device != flat.device:
        drawn = torch.multinomial(flat.cpu(), 1, generator=generator).to(flat.device)
    else:
        drawn = torch.multinomial(flat, 1, generator=generator)
    return drawn.reshape(probs.shape[:-1]), probs


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
    k: int | None = None,
) -> torch.Tensor:
    """Positions to unmask this step: BoolTensor like `candidates` ([b, n]).

    Per row: the candidates whose score passes `threshold` (> when larger is better, < otherwise),
    or, with `k`, the k best candidates; always at least one (the best) while the row has candidates.
    Rows without candidates unmask nothing. Ties among equal scores go to the leftmost position.
    """
    if scores.shape != candidates.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)} and candidates {tuple(candidates.shape)} must have equal shapes"
        )
    if (threshold is None) == (k is None):
        raise ValueError("select_unmask needs exactly one of threshold and k")
    candidates = candidates.bool()
    signed = scores.float() if larger_is_better else -scores.float()
    ranked = signed.masked_fill(~candidates, float("-inf"))
    if k is not None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        take = min(k, ranked.shape[-1])
        top = ranked.topk(take, dim=-1).indices
        chosen = torch.zeros_like(candidates).scatter(-1, top, True)
        return chosen & candidates
    passed = (scores > threshold) if larger_is_better else (scores < threshold)
    chosen = passed & candidates
    # argmax returns the first maximum, so ties resolve to the leftmost position.
    best = ranked.argmax(dim=-1, keepdim=True)
    at_least_one = torch.zeros_like(candidates).scatter(-1, best, True) & candidates
    return chosen | at_least_one


def unmask_step(
    logits: torch.Tensor,
    candidates: torch.Tensor,
    unmasking: UnmaskingConfig,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One refinement step over a block: (tokens [b, n], unmask [b, n]).

    `logits` [b, n, V] are the predictions for the block's positions (already shifted when token shift
    is on); `candidates` marks the still-masked positions allowed to be unmasked now.
    """
    tokens, probs = propose_tokens(logits, sampling, generator)
    rule = unmasking.rule
    if rule == "topk":
        chosen = select_unmask(
            confidence_scores(probs, tokens), candidates, threshold=None, k=unmasking.k
        )
    elif rule == "confidence":
        chosen = select_unmask(
            confidence_scores(probs, tokens), candidates, threshold=unmasking.threshold
        )
    elif rule == "margin":
        chosen = select_unmask(margin_scores(probs), candidates, threshold=unmasking.threshold)
    else:
        chosen = select_unmask(
            entropy_scores(probs), candidates, threshold=unmasking.threshold, larger_is_better=False
        )
    return tokens, chosen
