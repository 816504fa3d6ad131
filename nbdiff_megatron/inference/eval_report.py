"""What `nbdiff eval` reports beside accuracy, the way block-diffusion papers report it: per task the
decoding cost (tokens per forward TPF, forwards NFE, tokens/s), one row per unmasking threshold, and a
plot of accuracy against TPF; and the data-parallel split of decoding work over torchrun ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch.distributed as dist

from nbdiff_megatron.errors import InferenceError
from nbdiff_megatron.inference.refinement import DecodeStats


def add_stats(total: DecodeStats, more: DecodeStats) -> None:
    """Accumulate `more` into `total` (every counter, and the seconds)."""
    for f in fields(DecodeStats):
        setattr(total, f.name, getattr(total, f.name) + getattr(more, f.name))


def stats_record(stats: DecodeStats) -> dict[str, float]:
    """The decoding columns of a task: TPF, NFE, tokens, tokens/s, seconds."""
    return {
        "tpf": stats.tokens_per_forward,
        "nfe": stats.forward_passes,
        "tokens": stats.generated_tokens,
        "tokens_per_s": stats.tokens_per_second,
        "seconds": stats.seconds,
    }


def accuracy_of(metrics: dict[str, Any]) -> tuple[str, float] | None:
    """The headline metric of a task's lm-eval results: the first finite number that is not a
    standard error ("exact_match,strict-match", "acc,none", ...)."""
    for key in sorted(metrics):
        value = metrics[key]
        if "stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            return key, float(value)
    return None


def table_rows(runs: list[dict[str, Any]]) -> list[str]:
    """One printed line per (threshold, task): accuracy beside TPF, NFE and tokens/s."""
    lines = []
    for run in runs:
        label = "" if run.get("threshold") is None else f"threshold {run['threshold']:g}  "
        for task, metrics in run["results"].items():
            shown = {
                k: v
                for k, v in metrics.items()
                if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))
            }
            line = f"{label}{task}: " + ", ".join(
                f"{k} = {v:.4f}" for k, v in sorted(shown.items())
            )
            cost = run["decoding"].get(task)
            if cost:
                line += (
                    f" | TPF {cost['tpf']:.2f}, NFE {cost['nfe']}, "
                    f"{cost['tokens_per_s']:.1f} tokens/s"
                )
            lines.append(line)
    return lines


def plot_accuracy_vs_tpf(runs: list[dict[str, Any]], path: str | Path) -> None:
    """A PNG of accuracy against TPF, one line per task, one point per threshold."""
    try:
        # heavy (seconds at import): only --plot draws
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # after use("Agg"): files only, no display
    except ImportError as exc:
        raise InferenceError("--plot needs matplotlib: pip install matplotlib") from exc
    fig, ax = plt.subplots(figsize=(5, 3.5))
    tasks = sorted({t for run in runs for t in run["results"]})
    for task in tasks:
        points = []
        for run in runs:
            best = accuracy_of(run["results"].get(task, {}))
            cost = run["decoding"].get(task)
            if best is not None and cost:
                points.append((cost["tpf"], best[1], run.get("threshold")))
        points.sort()
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=task)
        for tpf, acc, threshold in points:
            if threshold is not None:
                ax.annotate(f"{threshold:g}", (tpf, acc), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("tokens per forward (TPF)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy vs decoding parallelism (labels: threshold)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------- data parallel
def data_parallel_group() -> tuple[int, int, Any]:
    """(rank, size, group) of the data-parallel ranks decoding work is split over: megatron-core's
    data-parallel group under torchrun (tensor-parallel ranks decode the same inputs), else one rank."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1, None
    # megatron-core on first use (`nbdiff eval --help` imports this module without it); its parallel
    # state is initialised by the model builder under torchrun
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return dist.get_rank(), dist.get_world_size(), None
    group = parallel_state.get_data_parallel_group()
    return dist.get_rank(group), dist.get_world_size(group), group


def run_sharded(work: Sequence[Any], decode: Callable[[Any], Any]) -> list[Any]:
    """`[decode(w) for w in work]`, the items dealt round-robin over the data-parallel ranks and
    gathered back in order on every rank. Each item is decoded exactly as one rank would (same batch),
    so the results equal a one-rank run."""
    rank, size, group = data_parallel_group()
    mine = {i: decode(work[i]) for i in range(rank, len(work), size)}
    if size == 1:
        return [mine[i] for i in range(len(work))]
    gathered: list[dict[int, Any] | None] = [None] * size
    dist.all_gather_object(gathered, mine, group=group)
    merged: dict[int, Any] = {}
    for part in gathered:
        merged.update(part or {})
    return [merged[i] for i in range(len(work))]


def is_main_rank() -> bool:
    """Rank 0 prints and writes the report."""
    return not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0
