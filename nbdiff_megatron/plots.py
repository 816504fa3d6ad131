"""Pictures people check before spending a cluster: the training mask and a config's schedules.

`nbdiff show-mask` draws the 2L x 2L mask of x_t ⊕ x_0 with its four quadrants labelled, like Figure 4 of
the NBDiff paper; `nbdiff show-curriculum` plots B(s), λ(s) and the LR over a config's steps
(`--a.b=value` overrides as for `nbdiff train`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nbdiff_megatron.errors import ConfigError
from nbdiff_megatron.method.masks import annealed_training_mask, training_mask
from nbdiff_megatron.training.config import load_config

ACCEPTS_OVERRIDES = True  # show-curriculum takes a config's --a.b=value overrides


def pyplot():
    """matplotlib.pyplot drawing to files (the Agg backend)."""
    # matplotlib costs seconds at import; only the commands that draw pay for it.
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster login nodes or CI
    import matplotlib.pyplot as plt  # after use("Agg"): pyplot starts on that backend

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """`fig` laid out and written to `path` as a PNG (folders created), then closed."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def parse_doc_lengths(text: str | None, seq_len: int) -> torch.Tensor | None:
    """ "3,5,8" -> doc ids [0,0,0,1,1,1,1,1,2,...]; the lengths must add up to seq_len."""
    if not text:
        return None
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ConfigError(f"--doc-lengths must be comma-separated integers, got {text!r}") from exc
    if any(n < 1 for n in lengths) or sum(lengths) != seq_len:
        raise ConfigError(
            f"--doc-lengths {text!r} must be positive and add up to --seq-len {seq_len} "
            f"(they add up to {sum(lengths)})"
        )
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def draw_mask(
    mask: torch.Tensor,
    path: str | Path,
    *,
    title: str,
    block_size: int,
    kind: str,
) -> Path:
    """Save a [2L, 2L] boolean mask (True = may attend) as a labelled PNG."""
    plt = pyplot()
    two_l = mask.shape[-1]
    seq_len = two_l // 2
    size = min(12.0, max(5.0, two_l / 12))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(mask.float().numpy(), cmap="Blues", vmin=0, vmax=1.25, interpolation="nearest")
    for v in (seq_len - 0.5,):
        ax.axhline(v, color="black", linewidth=2)
        ax.axvline(v, color="black", linewidth=2)
    if seq_len <= 96 and block_size > 1:
        for edge in range(block_size, seq_len, block_size):
            for off in (0, seq_len):
                ax.axhline(off + edge - 0.5, color="grey", linewidth=0.4, alpha=0.6)
                ax.axvline(off + edge - 0.5, color="grey", linewidth=0.4, alpha=0.6)
    clean_label = "M_CC (causal)" if kind == "context_causal" else "M_BC (block-causal)"
    labels = {
        (0, 0): "M_BD\nx_t → x_t\nsame block",
        (0, 1): "M_OBC\nx_t → x_0\nearlier blocks",
        (1, 0): "0\nx_0 never sees x_t",
        (1, 1): f"{clean_label}\nx_0 → x_0",
    }
    # every quadrant is empty at its top-right corner (nothing attends to the future there)
    for (row, col), text in labels.items():
        ax.text(
            (col + 1) * seq_len - 1.0,
            row * seq_len,
            text,
            ha="right",
            va="top",
            fontsize=10,
            color="darkred",
            bbox=dict(facecolor="white", alpha=0.75, edgecolor="none"),
        )
    ticks = [seq_len / 2 - 0.5, seq_len + seq_len / 2 - 0.5]
    ax.set_xticks(ticks, ["x_t (noised)", "x_0 (clean)"])
    ax.set_yticks(ticks, ["x_t", "x_0"])
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title)
    return save_figure(fig, path)


def _add_show_mask(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-len", type=int, default=32, help="L, the length of x_0 (default 32)")
    parser.add_argument("--block-size", type=int, default=8, help="B (default 8)")
    parser.add_argument(
        "--kind",
        default="context_causal",
        choices=["context_causal", "block_causal", "annealed"],
        help="mask family (default context_causal, NBDiff's)",
    )
    parser.add_argument(
        "--progress", type=float, default=0.5, help="annealed only: 0 = B=1 mask, 1 = target-B mask"
    )
    parser.add_argument("--doc-lengths", default=None, help='packed documents, e.g. "10,22"')
    parser.add_argument("--seed", type=int, default=0, help="annealed only: random seed")
    parser.add_argument("--out", default="mask.png", help="output PNG (default mask.png)")


def _run_show_mask(args: argparse.Namespace) -> int:
    doc_ids = parse_doc_lengths(args.doc_lengths, args.seq_len)
    try:
        if args.kind == "annealed":
            gen = torch.Generator().manual_seed(args.seed)
            mask = annealed_training_mask(
                args.seq_len, args.block_size, args.progress, generator=gen, doc_ids=doc_ids
            )
            kind = "context_causal"
        else:
            mask = training_mask(args.seq_len, args.block_size, args.kind, doc_ids)
            kind = args.kind
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    title = f"NBDiff training mask: {args.kind}, L={args.seq_len}, B={args.block_size}"
    if args.kind == "annealed":
        title += f", progress={args.progress}"
    if doc_ids is not None:
        title += f"\ndocuments of lengths {args.doc_lengths}"
    # block grid lines only without documents: blocks restart at each document start
    grid = args.block_size if doc_ids is None else 1
    path = draw_mask(mask, args.out, title=title, block_size=grid, kind=kind)
    density = mask.float().mean().item()
    print(f"wrote {path}  ({2 * args.seq_len}x{2 * args.seq_len}, {density:.1%} of entries attend)")
    return 0


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "show-mask":
        _add_show_mask(parser)
    else:
        _add_show_curriculum(parser)


def run(args: argparse.Namespace) -> int:
    if args.command == "show-mask":
        if args.overrides:
            raise ConfigError(f"unrecognized arguments: {' '.join(args.overrides)}")
        return _run_show_mask(args)
    return _run_show_curriculum(args)


# ---------------------------------------------------------------------------------------------- curriculum


def _add_show_curriculum(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a training YAML config (examples/*.yaml)")
    parser.add_argument(
        "--out", default="curriculum.png", help="output PNG (default curriculum.png)"
    )


def curriculum_series(cfg, max_points: int = 4000) -> dict[str, list]:
    """B(k), λ(k) and LR(k) of a training config at up to ``max_points`` steps k = 1..train.steps
    (every step if fewer; steps are numbered as the logs number them, method/curriculum.py)."""
    schedule = cfg.step_schedule()
    total = cfg.train.steps
    stride = max(1, -(-total // max_points))
    steps = sorted(set(range(1, total + 1, stride)) | {total})
    return {
        "step": steps,
        "block_size": [schedule.block_size(s) for s in steps],
        "ar_weight": [schedule.ar_weight(s) for s in steps],
        "lr": [schedule.lr(s) for s in steps],
    }


def draw_curriculum(series: dict[str, list], path: str | Path, *, title: str) -> Path:
    """Three stacked step plots: block size (log2 axis), AR weight λ, learning rate."""
    plt = pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(8, 7.5), sharex=True)
    panels = [
        ("block_size", "block size B(s)", "tab:blue"),
        ("ar_weight", "AR weight λ(s)", "tab:orange"),
        ("lr", "learning rate", "tab:green"),
    ]
    for ax, (key, label, color) in zip(axes, panels):
        ax.step(series["step"], series[key], where="post", color=color)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log", base=2)
    axes[-1].set_xlabel("step")
    axes[0].set_title(title)
    return save_figure(fig, path)


def _run_show_curriculum(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    series = curriculum_series(cfg)
    blocks = series["block_size"]
    reached = next((s for s, b in zip(series["step"], blocks) if b == max(blocks)), None)
    title = f"{Path(args.config).name}: {cfg.train.steps} steps"
    path = draw_curriculum(series, args.out, title=title)
    print(f"wrote {path}")
    print(f"  block size {blocks[0]} -> {blocks[-1]} (reached {max(blocks)} at step ~{reached})")
    lam = series["ar_weight"]
    print(f"  AR weight  {lam[0]:.3g} -> {lam[-1]:.3g} ({cfg.curriculum.ar_weight_anneal})")
    print(
        f"  LR         peak {max(series['lr']):.3g}, final {series['lr'][-1]:.3g} "
        f"({cfg.schedule.style})"
    )
    return 0
