"""`nbdiff demo` (`make demo`): the whole NBDiff path on a laptop CPU in a few minutes.

1. prepares the bundled public-domain corpus as a Megatron indexed dataset;
2. trains a tiny autoregressive model on it (block size 1, λ = 1: plain next-token training);
3. adapts that model into a block-diffusion model with NBDiff (block growth 1 -> 8, AR loss kept);
4. decodes a continuation of a prompt with block diffusion (KV cache, parallel unmasking) next to the AR
   decoding of the same model, and reports tokens per forward pass;
5. draws the loss curves and the curriculum as PNG files and prints where everything is.

Everything runs in this process through the same code as `nbdiff train` (examples/tiny_cpu.yaml, with
the demo's step counts and block-growth schedule). The model is trained on a few pages of text until it
knows them by heart, so its predictions are confident: the demo shows the mechanics of block decoding
(tokens per forward above 1 with the AR decoder's output), not a model that generalises.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbdiff_megatron.data.bundled import (
    bundled_tokenizer_path,
    example_config,
    iter_bundled_documents,
    prepare_bundled_corpus,
)
from nbdiff_megatron.data.preprocess import read_sidecar
from nbdiff_megatron.inference import ARDecoder, BlockDecoder
from nbdiff_megatron.inference.unmasking import UnmaskingConfig
from nbdiff_megatron.model.parallel import destroy_parallel
from nbdiff_megatron.plots import curriculum_series, draw_curriculum, pyplot, save_figure
from nbdiff_megatron.training.config import load_config

EXAMPLE = example_config("tiny_cpu.yaml")  # packaged with the wheel (setup.py)
DEFAULT_PROMPT = "1 In the beginning God created"
# Thresholds decoded besides --threshold (the speed / agreement trade-off).
SWEEP_THRESHOLDS = (0.9, 0.7, 0.5)
# Further prompts (verse openings of the training text) decoded for the averaged TPF / agreement.
MORE_PROMPTS = 8
# The bundled corpus starts with Genesis, one chapter per document; its first 2 chapters (~1,900
# tokens) are learned by heart in a few CPU minutes, which is what makes the predictions confident
# (with 3 chapters in the same time, block decoding committed fewer tokens per forward).
DEFAULT_DOCUMENTS = 2
# `nbdiff demo --model.hidden_size=128 ...`: config overrides applied to both training phases.
ACCEPTS_OVERRIDES = True

_BOLD = "\033[1m" if sys.stdout.isatty() else ""
_DIM = "\033[2m" if sys.stdout.isatty() else ""
_RESET = "\033[0m" if sys.stdout.isatty() else ""


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--ar-steps", type=int, default=200, help="AR pre-training steps (200)")
    parser.add_argument(
        "--nbdiff-steps", type=int, default=500, help="NBDiff adaptation steps (500)"
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (40)")
    parser.add_argument(
        "--threshold", type=float, default=0.9, help="confidence threshold for unmasking (0.9)"
    )
    parser.add_argument(
        "--max-documents",
        type=int,
        default=DEFAULT_DOCUMENTS,
        help=f"train on the first N documents (chapters) of the corpus ({DEFAULT_DOCUMENTS}; 0 = all)",
    )


def nbdiff_phase_overrides(steps: int) -> list[str]:
    """The demo's NBDiff schedule for `steps` steps: B doubles 1 -> 8 over the first ~quarter of
    the run (B = 2, 4, 8 at 2, 3, 4 x steps/16) so most steps train the target block size."""
    growth = max(1, steps // 16)  # run() prints the same schedule
    return [
        f"--train.steps={steps}",
        f"--curriculum.growth_warmup={growth}",
        f"--curriculum.growth_interval={growth}",
        f"--schedule.warmup_steps={min(20, steps // 4)}",
        f"--schedule.decay_steps={max(0, min(steps * 2 // 5, steps - 20))}",
    ]


def train_more_command(save: Path, steps: int) -> str:
    """The command that continues the demo's NBDiff run to `steps`, from any directory: the run's
    own config.yaml (the demo's data, block-growth schedule and save directory, absolute paths), so
    it resumes from the newest checkpoint in `save` at the block size the demo reached."""
    return shlex.join(
        ["nbdiff", "train", "--config", str(save / "config.yaml"), f"--train.steps={steps}"]
    )


def _section(index: int, total: int, title: str) -> None:
    print(f"\n{_BOLD}[{index}/{total}] {title}{_RESET}", flush=True)


def _note(text: str) -> None:
    print(textwrap.indent(textwrap.fill(text, 96), "      "), flush=True)


def _overrides(args: argparse.Namespace, data_prefix: str, *extra: str) -> list[str]:
    return [
        f"--data.data_path=[{data_prefix}]",
        f"--data.tokenizer_model={bundled_tokenizer_path()}",
        "--logging.log_interval=50",
        *extra,
        *(getattr(args, "overrides", None) or []),
    ]


def _train_phase(args: argparse.Namespace, overrides: list[str], label: str) -> Any:
    # lazy: the training loop brings megatron-core, which `nbdiff demo --help` must not import
    from nbdiff_megatron.training.loop import train

    cfg = load_config(EXAMPLE, overrides)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)  # one process, its own group
    try:
        return cfg, train(cfg, label=label)
    finally:
        destroy_parallel()
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(name, None)


def _plot_losses(ar_hist: list[dict], nb_hist: list[dict], path: Path) -> Path:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot([r["step"] for r in ar_hist], [r["ar"] for r in ar_hist], color="tab:gray")
    left.set_title("1. AR pre-training (B = 1, λ = 1)")
    left.set_xlabel("step")
    left.set_ylabel("next-token cross-entropy")
    left.grid(alpha=0.3)
    steps = [r["step"] for r in nb_hist]
    right.plot(steps, [r["loss"] for r in nb_hist], label="total = (1-λ) MDM + λ AR", color="black")
    right.plot(
        steps,
        [r["mdm"] for r in nb_hist],
        label="L_MDM (masked tokens, 1/t weighted)",
        color="tab:blue",
        alpha=0.8,
    )
    right.plot(steps, [r["ar"] for r in nb_hist], label="L_AR (clean half)", color="tab:orange")
    previous = None
    for r in nb_hist:  # mark where the block grows
        if previous is not None and r["block_size"] != previous:
            right.axvline(r["step"], color="tab:green", alpha=0.4, linestyle="--")
            right.text(
                r["step"],
                right.get_ylim()[1],
                f" B={r['block_size']}",
                va="top",
                fontsize=8,
                color="tab:green",
            )
        previous = r["block_size"]
    right.set_title("2. NBDiff adaptation (block growth, AR loss kept)")
    right.set_xlabel("step")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    return save_figure(fig, path)


@dataclass
class Decoded:
    """One decoding of the prompt and what it cost."""

    label: str
    """How it was decoded (e.g. "threshold 0.9", "AR")."""
    tokens: list[int]
    """Generated ids (prompt excluded)."""
    text: str
    """The generated ids as text."""
    forward_passes: int
    """Model forwards, prefill and block commits included (the NFE)."""
    tokens_per_forward: float
    """TPF: generated tokens per forward pass."""


def same_tokens(tokens: list[int], reference: list[int]) -> int:
    """How many of `tokens` equal `reference` at the same position (0 past the shorter one)."""
    return sum(a == b for a, b in zip(tokens, reference))


def source_continuation(prompt: str, max_documents: int, tok: Any, length: int) -> list[int]:
    """The `length` ids that follow `prompt` in the first training document containing it.

    Empty when the prompt is not in the training text or its ids are not a prefix of the ids of
    prompt + continuation (a BPE merge across the boundary): then there is nothing to compare with.
    """
    for index, doc in enumerate(iter_bundled_documents()):
        if max_documents and index >= max_documents:
            break
        at = doc["text"].find(prompt)
        if at < 0:
            continue
        prompt_ids = tok.encode(prompt)
        ids = tok.encode(doc["text"][at:])
        if ids[: len(prompt_ids)] != prompt_ids:
            return []
        return ids[len(prompt_ids) : len(prompt_ids) + length]
    return []


def verse_prompts(max_documents: int, count: int, words: int = 6) -> list[str]:
    """`count` verse openings (the verse number and the next words) spread evenly over the first
    `max_documents` documents of the corpus (0 = all): more prompts for the TPF measurement."""
    verses = []
    for index, doc in enumerate(iter_bundled_documents()):
        if (max_documents and index >= max_documents) or (not max_documents and index >= 50):
            break
        for line in doc["text"].splitlines():
            if re.match(r"\d+ \S", line) and len(line.split()) > words + 8:
                verses.append(" ".join(line.split()[: words + 1]))
    if count <= 0 or not verses:
        return []
    stride = max(1, len(verses) // count)
    return verses[stride // 2 :: stride][:count]


def _decode(
    checkpoint: str, prompts: list[str], max_new_tokens: int, thresholds: list[float]
) -> tuple[list[tuple[list[Decoded], Decoded]], int, Any]:
    """Continue each prompt greedily with block diffusion at each confidence threshold and with
    next-token decoding of the same weights.

    Returns ([(block runs in threshold order, AR run) per prompt], block size, tokenizer).
    """
    # lazy: loading imports megatron-core, which `nbdiff demo --help` must not import
    from nbdiff_megatron.inference.loading import load_megatron

    loaded = load_megatron(Path(checkpoint))
    tok = loaded.tokenizer

    def record(label: str, out: Any) -> Decoded:
        tokens = out.tokens[0]
        stats = out.stats
        return Decoded(
            label, tokens, tok.decode(tokens), stats.forward_passes, stats.tokens_per_forward
        )

    results = []
    try:
        for prompt in prompts:
            ids = tok.encode(prompt)
            new = max(1, min(max_new_tokens, loaded.model_config.seq_length - len(ids)))
            common = dict(mask_id=loaded.mask_id, eos_ids=loaded.eos_ids, max_new_tokens=new)
            runs = []
            for threshold in thresholds:
                decoder = BlockDecoder(
                    loaded.model,
                    block_size=loaded.block_size,
                    token_shift=loaded.token_shift,
                    mask_kind=loaded.mask_kind,
                    unmasking=UnmaskingConfig(rule="confidence", threshold=threshold),
                    **common,
                )
                runs.append(record(f"threshold {threshold:g}", decoder.generate([ids])))
            ar = record("AR", ARDecoder(loaded.model, **common).generate([ids]))
            results.append((runs, ar))
    finally:
        destroy_parallel()
    return results, loaded.block_size, tok


def _show_text(label: str, prompt: str, text: str) -> None:
    flat = " ".join(text.split())
    lines = textwrap.wrap(f"{prompt} {_BOLD}{flat}{_RESET}", 84) or [""]
    print(f"      {label:<11} {lines[0]}")
    for line in lines[1:]:
        print(f"      {'':<11} {line}")


def _cost(run: Decoded) -> str:
    return (
        f"{len(run.tokens)} tokens in {run.forward_passes} forward passes = "
        f"{run.tokens_per_forward:.2f} tokens/forward"
    )


STEPS = 5
"""Sections the demo prints (corpus, AR, NBDiff, decoding, pictures)."""


def run(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.monotonic()
    out = Path(args.out).resolve()
    print(
        f"{_BOLD}NBDiff demo{_RESET}: from a next-token model to a next-block model, on this CPU."
    )
    _note(f"Everything is written under {out}. Expect a few minutes on 2 cores.")
    prefix = _prepare_corpus(args, out)
    ar_save, ar_result = _ar_phase(args, out, prefix)
    nb_save, nb_cfg, nb_result = _nbdiff_phase(args, out, prefix, ar_save)
    headline, ar, same = _decoding(args, nb_result.checkpoint)

    _section(5, STEPS, "Pictures")
    losses_png = _plot_losses(ar_result.history, nb_result.history, out / "loss_curves.png")
    curriculum_png = draw_curriculum(
        curriculum_series(nb_cfg),
        out / "curriculum.png",
        title="NBDiff adaptation in the demo (examples/tiny_cpu.yaml, demo schedule)",
    )

    print(f"\n{_BOLD}Done in {(time.monotonic() - started) / 60:.1f} min.{_RESET}")
    first_ar, last_ar = ar_result.history[0]["ar"], ar_result.history[-1]["ar"]
    last_nb = nb_result.history[-1]
    rows = [
        ("AR loss", f"{first_ar:.2f} -> {last_ar:.2f} (next-token cross-entropy)"),
        (
            "NBDiff loss",
            f"total {last_nb['loss']:.2f}, MDM {last_nb['mdm']:.2f}, AR "
            f"{last_nb['ar']:.2f} at B = {last_nb['block_size']}",
        ),
        (
            "decoding",
            f"{headline.tokens_per_forward:.2f} tokens/forward at threshold {args.threshold:g} "
            f"(AR {ar.tokens_per_forward:.2f}), {same}/{len(ar.tokens)} tokens as AR's greedy "
            "output",
        ),
        ("loss curves", str(losses_png)),
        ("curriculum", str(curriculum_png)),
        ("AR model", ar_result.checkpoint),
        ("NBDiff model", nb_result.checkpoint),
        ("metrics", f"{out / 'nbdiff' / 'metrics.jsonl'} (one JSON line per step)"),
        ("TensorBoard", f"tensorboard --logdir {out}"),
        ("decode more", f'nbdiff generate --load {nb_save} --prompt "..."'),
        (
            "train more",
            train_more_command(nb_save, args.nbdiff_steps + max(8, args.nbdiff_steps // 5)),
        ),
    ]
    for name, value in rows:
        print(f"  {name:<13} {value}")
    return 0


def _prepare_corpus(args: argparse.Namespace, out: Path) -> str:
    """Step 1: the bundled corpus as an indexed dataset; returns its prefix."""
    _section(1, STEPS, "Preparing the bundled corpus (public-domain text, BPE tokenizer)")
    t0 = time.monotonic()
    prefix = prepare_bundled_corpus(str(out / "data"), max_documents=args.max_documents or None)
    _note(f"indexed dataset {prefix}.bin/.idx ({time.monotonic() - t0:.0f} s)")
    if args.max_documents:
        size = (read_sidecar(prefix) or {}).get("tokens_all_keys")
        _note(
            f"The demo trains on the first {args.max_documents} chapter(s) of Genesis"
            + (f" ({size:,} tokens)" if size else "")
            + ", small enough for the tiny model to learn by heart in a few minutes: "
            "memorised text makes its predictions confident, which is what block decoding needs "
            "to commit several tokens per forward. This shows the mechanics, not generalisation."
        )
    return prefix


def _ar_phase(args: argparse.Namespace, out: Path, prefix: str) -> tuple[Path, Any]:
    """Step 2: AR pre-training (block size 1, λ = 1); returns (its save dir, its result)."""
    _section(2, STEPS, f"AR pre-training: {args.ar_steps} steps with block size 1 and λ = 1")
    _note(
        "Block diffusion with B = 1 is ordinary next-token training: this is the AR model that "
        "NBDiff starts from (in practice a pretrained LLM converted with `nbdiff convert`)."
    )
    ar_save = out / "ar"
    ar_extra = [
        f"--train.steps={args.ar_steps}",
        "--curriculum.start_block_size=1",
        "--curriculum.target_block_size=1",
        "--curriculum.ar_weight=1.0",
        f"--schedule.decay_steps={max(0, min(args.ar_steps // 5, args.ar_steps - 20))}",
        f"--schedule.warmup_steps={min(20, args.ar_steps // 4)}",
        f"--checkpoint.save={ar_save}",
        f"--checkpoint.save_interval={args.ar_steps}",
        "--checkpoint.keep_last=1",
    ]
    _, ar_result = _train_phase(args, _overrides(args, prefix, *ar_extra), "AR")
    return ar_save, ar_result


def _nbdiff_phase(
    args: argparse.Namespace, out: Path, prefix: str, ar_save: Path
) -> tuple[Path, Any, Any]:
    """Step 3: NBDiff adaptation from the AR model; returns (its save dir, config, result)."""
    _section(3, STEPS, f"NBDiff adaptation: {args.nbdiff_steps} steps, block size growing 1 -> 8")
    growth = max(1, args.nbdiff_steps // 16)
    _note(
        "Same weights, new objective: x_t ⊕ x_0 in one forward, L = (1-λ) L_MDM + λ L_AR, "
        "context-causal mask (examples/tiny_cpu.yaml); the block size doubles early "
        f"(B = 2, 4, 8 from steps {growth * 2}, {growth * 3}, {growth * 4}) so that most steps "
        "train the block size the decoder uses."
    )
    nb_save = out / "nbdiff"
    nb_extra = [
        f"--checkpoint.save={nb_save}",
        f"--checkpoint.load={ar_save}",
        "--checkpoint.finetune=true",
        "--checkpoint.keep_last=1",
        f"--checkpoint.save_interval={max(1, args.nbdiff_steps)}",
    ]
    nb_extra += nbdiff_phase_overrides(args.nbdiff_steps)
    nb_cfg, nb_result = _train_phase(args, _overrides(args, prefix, *nb_extra), "NBDiff")
    return nb_save, nb_cfg, nb_result


def _decoding(args: argparse.Namespace, checkpoint: str) -> tuple[Decoded, Decoded, int]:
    """Step 4: block decoding against next-token decoding of the same weights, over a threshold
    sweep and several prompts; returns (the --threshold run, the AR run, tokens they share)."""
    _section(4, STEPS, "Decoding a continuation: block diffusion vs. next-token, same weights")
    thresholds = sorted({args.threshold, *SWEEP_THRESHOLDS}, reverse=True)
    more_prompts = [
        p for p in verse_prompts(args.max_documents, MORE_PROMPTS + 1) if p != args.prompt
    ][:MORE_PROMPTS]
    decoded, size, tok = _decode(
        checkpoint, [args.prompt, *more_prompts], args.max_new_tokens, thresholds
    )
    runs, ar = decoded[0]
    headline = next(r for r in runs if r.label == f"threshold {args.threshold:g}")
    source = source_continuation(args.prompt, args.max_documents, tok, len(ar.tokens))
    _show_text("NBDiff", args.prompt, headline.text)
    print(
        f"      {'':<11} {_DIM}blocks of {size}, unmask tokens with confidence > "
        f"{args.threshold:g}: {_cost(headline)}{_RESET}"
    )
    _show_text("AR", args.prompt, ar.text)
    print(f"      {'':<11} {_DIM}next-token decoding: {_cost(ar)}{_RESET}")
    same = same_tokens(headline.tokens, ar.tokens)
    agreement = (
        f"{same}/{len(ar.tokens)} of the block decoder's tokens equal AR's greedy tokens at the "
        "same position"
    )
    if source:
        agreement += (
            f"; AR reproduces {same_tokens(ar.tokens, source)}/{len(source)} tokens of the "
            "training text, block decoding "
            f"{same_tokens(headline.tokens, source)}/{len(source)}"
        )
    _note(f"Measured: {agreement}.")
    _print_sweep(decoded)
    if more_prompts:
        _note(
            f"The other {len(more_prompts)} prompts are verse openings of the training text, e.g. "
            f'"{more_prompts[0]}"; "tokens/fwd" over all prompts is their tokens over their '
            'forwards. "same as AR" compares position by position, so one dropped or inserted '
            "token counts every later position of that prompt as different."
        )
    lowest = runs[-1]
    if lowest is not headline and lowest.tokens != headline.tokens:
        _show_text(f"at {thresholds[-1]:g}", args.prompt, lowest.text)
    print()
    _explain_decoding(size)
    return headline, ar, same


def _print_sweep(decoded: list[tuple[list[Decoded], Decoded]]) -> None:
    """The threshold table: the first prompt's runs, and all prompts' together."""
    runs, ar = decoded[0]
    n = len(decoded)
    print(f"\n      {'':<15}{'this prompt':^34}{f'all {n} prompts':^26}")
    print(
        f"      {'unmask at':<15}{'forwards':>9}{'tokens/fwd':>12}{'same as AR':>13}"
        f"{'tokens/fwd':>13}{'same as AR':>13}"
    )
    ar_total = sum(len(a.tokens) for _, a in decoded)
    for i, run in enumerate(runs):
        tokens = sum(len(r[i].tokens) for r, _ in decoded)
        forwards = sum(r[i].forward_passes for r, _ in decoded)
        agree = sum(same_tokens(r[i].tokens, a.tokens) for r, a in decoded)
        print(
            f"      {run.label:<15}{run.forward_passes:>9}{run.tokens_per_forward:>12.2f}"
            f"{same_tokens(run.tokens, ar.tokens):>10}/{len(ar.tokens):<2}"
            f"{tokens / forwards:>13.2f}{agree:>10}/{ar_total}"
        )
    ar_forwards = sum(a.forward_passes for _, a in decoded)
    print(
        f"      {'AR (next-token)':<15}{ar.forward_passes:>9}{ar.tokens_per_forward:>12.2f}"
        f"{'-':>13}{ar_total / ar_forwards:>13.2f}{'-':>13}"
    )


def _explain_decoding(size: int) -> None:
    """How block decoding spends its forwards, and how to read the numbers."""
    _note(
        f"Each block of {size} starts from the AR prediction of its first token (token shift); its "
        "other tokens start as [MASK] and are refined in forwards that read the cached prefix and "
        "attend both ways inside the block; every forward unmasks the tokens whose probability "
        "passes the threshold (at least one), and one last forward writes the finished block into "
        "the KV cache; that forward also runs the next block's first step when the next block's "
        "first token was guessed right (the fused commit), so a block costs 1 forward at best "
        f"({size:g} tokens/forward for blocks of {size}), at least 2 when the guess fails; 1 is next-token "
        "speed. Lower thresholds commit more "
        "tokens per forward at the risk of committing wrong ones (the table)."
    )
    _note(
        "Read this as the mechanics, not as a language model: the tiny model has memorised its "
        "training text, so it is confident about masked tokens several positions ahead. Prompts it "
        "has not seen get poor, less confident continuations (try `nbdiff generate`); a large "
        "model trained long reaches this confidence on predictable spans (code, formulas, fixed "
        "phrases), which is where NBDiff's speed-up over AR decoding comes from (docs/METHOD.md §7)."
    )
