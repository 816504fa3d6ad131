"""`nbdiff ablate`: the paper's Table 2 (and Table 1's mask comparison) at any scale, one command.

From one AR checkpoint (trained first on the bundled corpus when `--ar-checkpoint` is not given), every
variant is adapted with identical data, seeds and token budget (same config, steps, batch, LR schedule,
noise seeds), changing only what it names:

| variant | mask | λ (AR loss) | block size |
| --- | --- | --- | --- |
| annealed | annealed (DiffuLLaMA-style) | 0 | target from step 1, mask annealed over the growth phase |
| plain | context-causal | 0 | target from step 1 |
| ar | context-causal | config's λ | target from step 1 |
| nbdiff | context-causal | config's λ | grows 1 -> target (eq. 3) |
| block_causal | block-causal | 0 | target from step 1 |

Each is then evaluated on held-out documents (the config's validation split, documents the training
split never contains): L_MDM at the target block size (the same noised views for every variant),
L_AR of a plain causal forward on the clean text, and block decoding at threshold 0.9 on held-out
prompts (tokens per forward; agreement with the AR start model's greedy continuation, position by
position). The AR start model is evaluated the same way as a reference row.

Outputs under `--out`: `results.json`, `ablation.png` (training loss curves + the final metrics), one
checkpoint folder with `metrics.jsonl` per variant. Under torchrun every variant trains on all ranks
with the config's layout; evaluation then runs the same on every rank at TP = PP = CP = 1 (it needs the
model on one device) and rank 0 writes the outputs.

megatron-core (through the model builder and the training loop, setup and checkpointing) is imported
inside the functions that use it: seconds that `nbdiff ablate --help` does not pay.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nbdiff_megatron.data.bundled import (
    bundled_tokenizer_path,
    example_config,
    prepare_bundled_corpus,
)
from nbdiff_megatron.data.datasets import build_datasets, required_split
from nbdiff_megatron.data.tokenizer import load_tokenizer
from nbdiff_megatron.errors import ConfigError
from nbdiff_megatron.inference import ARDecoder, BlockDecoder
from nbdiff_megatron.inference.unmasking import UnmaskingConfig
from nbdiff_megatron.method.losses import nbdiff_loss
from nbdiff_megatron.method.masks import training_position_ids
from nbdiff_megatron.method.noise import block_layout, mask_tokens, sample_t
from nbdiff_megatron.model.parallel import destroy_parallel, initialize_parallel
from nbdiff_megatron.plots import pyplot, save_figure
from nbdiff_megatron.training.config import load_config

EXAMPLE = example_config("tiny_cpu.yaml")  # packaged with the wheel (setup.py)
VARIANTS = ("annealed", "plain", "ar", "nbdiff", "block_causal")
ACCEPTS_OVERRIDES = True  # `--a.b=value` config overrides, applied to every training run

# CPU defaults: sized for <= 15 minutes on 2 idle cores (an estimate: docs/ABLATION.md has what was
# measured, on a shared machine).
DEFAULT_STEPS = 140
DEFAULT_AR_STEPS = 200
DEFAULT_DOCUMENTS = 240
DEFAULT_SPLIT = "90,10,0"


@dataclass(frozen=True)
class Variant:
    """One row of the table: what it changes relative to the config."""

    name: str
    mask_kind: str
    uses_ar_loss: bool
    grows: bool
    label: str


VARIANT_SPECS = {
    "annealed": Variant("annealed", "annealed", False, False, "annealed attention mask"),
    "plain": Variant("plain", "context_causal", False, False, "plain finetuning (target B, λ=0)"),
    "ar": Variant("ar", "context_causal", True, False, "+ AR loss"),
    "nbdiff": Variant("nbdiff", "context_causal", True, True, "+ AR loss + growth (NBDiff)"),
    "block_causal": Variant(
        "block_causal", "block_causal", False, False, "block-causal plain finetuning"
    ),
}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--out", default="runs/ablate", help="output folder (default runs/ablate)")
    parser.add_argument(
        "--config",
        default=None,
        help="training config of the variants (default examples/tiny_cpu.yaml on the bundled "
        "corpus); --a.b=value overrides apply to every run",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help=f"steps per variant (CPU default {DEFAULT_STEPS})"
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)",
    )
    parser.add_argument(
        "--ar-checkpoint",
        default=None,
        help="AR checkpoint to start from; default: train one first (--ar-steps)",
    )
    parser.add_argument(
        "--ar-steps", type=int, default=DEFAULT_AR_STEPS, help="AR pre-training steps"
    )
    parser.add_argument(
        "--documents",
        type=int,
        default=DEFAULT_DOCUMENTS,
        help="default config only: bundled-corpus documents to use (train + held-out split)",
    )
    parser.add_argument("--eval-samples", type=int, default=64, help="held-out samples for losses")
    parser.add_argument("--eval-prompts", type=int, default=12, help="held-out decoding prompts")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="tokens per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to decode")
    parser.add_argument("--threshold", type=float, default=0.9, help="unmasking threshold (0.9)")


# ------------------------------------------------------------------------------- configs


def _scaled(value: int, steps: int, base_steps: int) -> int:
    return int(round(value * steps / base_steps))


def variant_overrides(variant: Variant, base: Any, steps: int) -> list[str]:
    """Config overrides of one variant: same everything, except its mask, λ and growth.

    Schedules of the config (LR warm-up/cooldown, growth warm-up/interval) are scaled to `steps` in
    proportion, so a shorter or longer run keeps the config's shape.
    """
    cur, sch = base.curriculum, base.schedule
    out = [f"--train.steps={steps}", f"--curriculum.mask_kind={variant.mask_kind}"]
    n = base.train.steps
    out += [
        f"--schedule.warmup_steps={_scaled(sch.warmup_steps, steps, n)}",
        f"--schedule.decay_steps={_scaled(sch.decay_steps, steps, n)}",
        f"--curriculum.growth_warmup={_scaled(cur.growth_warmup, steps, n)}",
        f"--curriculum.growth_interval={max(1, _scaled(cur.growth_interval, steps, n))}",
    ]
    if not variant.grows and variant.mask_kind != "annealed":
        out.append(f"--curriculum.start_block_size={cur.target_block_size}")
    if not variant.uses_ar_loss:
        out += [
            "--curriculum.ar_weight=0.0",
            "--curriculum.ar_weight_final=null",
            "--curriculum.ar_weight_anneal=constant",
        ]
    elif cur.ar_weight == 0.0:
        raise ConfigError(
            f"variant {variant.name!r} keeps the config's AR loss, but curriculum.ar_weight is 0; "
            "set --curriculum.ar_weight (e.g. 0.5)"
        )
    return out


def _train(cfg: Any, label: str) -> Any:
    # lazy: megatron-core, which `nbdiff ablate --help` skips (module doc)
    from nbdiff_megatron.training.loop import train

    return train(cfg, label=label)


def _rank() -> int:
    """This process's global rank (torchrun's RANK before the process group exists)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _prepare_bundled(out: Path, documents: int) -> str:
    """The bundled corpus as an indexed dataset: rank 0 writes it, other ranks wait for it."""
    ready = out / "data" / "READY"
    if _rank() == 0:
        prefix = prepare_bundled_corpus(str(out / "data"), max_documents=documents)
        ready.write_text(prefix)
        return prefix
    deadline = time.monotonic() + 600
    while not ready.is_file():
        if time.monotonic() > deadline:
            raise ConfigError(f"rank 0 did not prepare the bundled corpus in {out / 'data'}")
        time.sleep(0.5)
    return ready.read_text()


# ------------------------------------------------------------------------------- evaluation


@dataclass
class HeldOut:
    """The held-out evaluation set, shared by every variant."""

    x0: Any
    doc_ids: Any
    loss_mask: Any
    prompts: list[list[int]] = field(default_factory=list)


def held_out(cfg: Any, tokenizer: Any, samples: int, prompts: int, prompt_tokens: int) -> HeldOut:
    """Samples of the config's validation split (documents the training split does not hold)."""
    datasets = build_datasets(
        cfg.data, cfg.seq_length(), tokenizer, (None, None, None), seed=cfg.data.seed
    )
    valid = required_split(
        datasets,
        "validation",
        "ablate evaluates on held-out documents; give data.split a validation weight "
        "(e.g. --data.split=90,10,0)",
    )
    rows = [valid[i] for i in range(min(samples, len(valid)))]
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("tokens", "doc_ids", "loss_mask")}
    # Prompts: the opening tokens of held-out samples spread over the split (a sample may start
    # inside a document; the decoder then sees that text as a new document, for every model alike).
    chosen: list[list[int]] = []
    stride = max(1, len(valid) // max(1, prompts))
    for i in range(0, len(valid), stride):
        if len(chosen) >= prompts:
            break
        row = valid[i]
        docs, toks, real = row["doc_ids"], row["tokens"], row["loss_mask"]
        for doc in docs.unique().tolist():
            ids = toks[(docs == doc) & real].tolist()
            if len(ids) > prompt_tokens:
                chosen.append(ids[:prompt_tokens])
                break
    return HeldOut(batch["tokens"], batch["doc_ids"], batch["loss_mask"], chosen)


def _build_and_load(cfg: Any, checkpoint: str) -> Any:
    # lazy: megatron-core, which `nbdiff ablate --help` skips (module doc)
    from nbdiff_megatron.model.builder import build_model
    from nbdiff_megatron.training import checkpointing

    initialize_parallel(1, 1, 1, seed=cfg.train.seed)
    model = build_model(cfg.model, block_size=cfg.curriculum.target_block_size)
    checkpointing.load_checkpoint(checkpoint, [model], None, weights_only=True)
    return model.eval()


def evaluate(
    cfg: Any,
    checkpoint: str,
    data: HeldOut,
    *,
    mask_kind: str,
    mask_id: int,
    eos_ids: Any,
    reference: list[list[int]] | None,
    max_new_tokens: int,
    threshold: float,
) -> tuple[dict[str, float], list[list[int]]]:
    """Held-out L_MDM (target B), L_AR (causal forward), TPF and agreement of one checkpoint."""
    model = _build_and_load(cfg, checkpoint)
    block = cfg.curriculum.target_block_size
    shift = cfg.loss.token_shift
    # The trained target mask: the annealed baseline ends at the context-causal mask.
    kind = "block_causal" if mask_kind == "block_causal" else "context_causal"
    with torch.no_grad():
        mdm, ar = _heldout_losses(model, data, block=block, kind=kind, shift=shift, mask_id=mask_id)
        common = dict(mask_id=mask_id, eos_ids=eos_ids, max_new_tokens=max_new_tokens)

        def decoder() -> Any:
            if reference is None:  # the AR start model: its greedy continuation is the reference
                return ARDecoder(model, **common)
            return BlockDecoder(
                model,
                block_size=block,
                token_shift=shift,
                mask_kind=kind,
                unmasking=UnmaskingConfig(rule="confidence", threshold=threshold),
                **common,
            )

        tokens = forwards = agree = compared = 0
        continuations: list[list[int]] = []
        for i, prompt in enumerate(data.prompts):
            out = decoder().generate([prompt])
            generated = list(out.tokens[0])
            continuations.append(generated)
            tokens += len(generated)
            forwards += out.stats.forward_passes
            if reference is not None:
                agree += sum(a == b for a, b in zip(generated, reference[i]))
                compared += len(reference[i])
    result = {
        "heldout_mdm": mdm,
        "heldout_ar": ar,
        "tokens_per_forward": tokens / max(forwards, 1),
        "agreement_with_ar": (agree / compared) if compared else None,
    }
    return result, continuations


def _noised_views(
    data: HeldOut, *, block: int, shift: bool, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, masked, p): the same noised views for every variant (a fixed generator, uniform
    masking, per-block t), masked only where the loss counts."""
    x0, doc_ids, loss_mask = data.x0, data.doc_ids, data.loss_mask
    gen = torch.Generator().manual_seed(20251130)
    length = x0.shape[1]
    positions = training_position_ids(length, doc_ids)[:, :length]
    n_blocks = block_layout(x0.shape[0], length, block_size=block, positions=positions).n_blocks
    t = sample_t(x0.shape[0], n_blocks=n_blocks, generator=gen)
    x_t, masked, p = mask_tokens(
        x0,
        t,
        block_size=block,
        mask_id=mask_id,
        token_shift=shift,
        generator=gen,
        positions=positions,
        return_probability=True,
    )
    masked = masked & loss_mask
    x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return x_t, masked, p


def _heldout_losses(
    model: Any, data: HeldOut, *, block: int, kind: str, shift: bool, mask_id: int
) -> tuple[float, float]:
    """(L_MDM at the target block size, L_AR of a plain causal forward) over the held-out set."""
    # lazy: megatron-core, which `nbdiff ablate --help` skips (module doc)
    from nbdiff_megatron.model.builder import ar_forward, nbdiff_forward

    x_t, masked, p = _noised_views(data, block=block, shift=shift, mask_id=mask_id)
    device = next(model.parameters()).device
    mdm_sum = ar_sum = mdm_n = ar_n = 0.0
    for s in range(0, data.x0.shape[0], 16):
        sl = slice(s, s + 16)
        views = (x_t, data.x0, data.doc_ids, data.loss_mask, masked, p)
        xt_b, x0_b, doc_b, lm_b, m_b, p_b = [v[sl].to(device) for v in views]
        logits = nbdiff_forward(model, xt_b, x0_b, block_size=block, kind=kind, doc_ids=doc_b)
        terms = nbdiff_loss(
            logits.float(),
            x0_b,
            m_b,
            torch.where(p_b > 0, p_b, torch.ones_like(p_b)),
            ar_weight=0.0,
            token_shift=shift,
            loss_mask=lm_b,
            doc_ids=doc_b,
            validate=False,
        )
        mdm_sum += float(terms.mdm_sum)
        mdm_n += float(terms.mdm_count)
        # L_AR of the model as an AR model: a plain causal forward on the clean text (under the
        # block-causal mask the x_0 half would see its own targets).
        ar_logits = ar_forward(model, x0_b, doc_ids=doc_b).float()
        both = torch.cat([ar_logits, ar_logits], dim=1)
        ar_terms = nbdiff_loss(
            both,
            x0_b,
            torch.zeros_like(m_b),
            torch.ones_like(p_b),
            ar_weight=1.0,
            loss_mask=lm_b,
            doc_ids=doc_b,
            validate=False,
        )
        ar_sum += float(ar_terms.ar_sum)
        ar_n += float(ar_terms.ar_count)
    return mdm_sum / max(mdm_n, 1.0), ar_sum / max(ar_n, 1.0)


# ------------------------------------------------------------------------------- picture, table


def draw(results: dict[str, Any], path: Path) -> Path:
    """One PNG: training L_MDM / total loss curves per variant, then the held-out metrics as bars."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    variants = results["variants"]
    for name, entry in variants.items():
        hist = entry["history"]
        steps = [r["step"] for r in hist]
        axes[0].plot(steps, [r["mdm"] for r in hist], label=name)
    # With token shift nothing is masked at B = 1 (L_MDM = 0, off the log axis) until B grows.
    axes[0].set_title("training L_MDM per step (none at B = 1 with token shift)", fontsize=10)
    axes[0].set_xlabel("step")
    axes[0].set_yscale("log")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    names = ["AR start", *variants]
    rows = [results["ar_start"]["eval"], *(v["eval"] for v in variants.values())]
    _paired_bars(
        axes[1],
        names,
        ("held-out L_MDM (target B)", [r["heldout_mdm"] for r in rows]),
        ("held-out L_AR (causal)", [r["heldout_ar"] for r in rows]),
        title="held-out losses (lower is better)",
    )
    _paired_bars(
        axes[2],
        names,
        ("tokens per forward", [r["tokens_per_forward"] for r in rows]),
        ("agreement with AR greedy", [r["agreement_with_ar"] or 0.0 for r in rows]),
        title=f"block decoding at threshold {results['threshold']:g}, held-out prompts",
    )
    return save_figure(fig, path)


def _paired_bars(
    ax: Any,
    names: list[str],
    left: tuple[str, list[float]],
    right: tuple[str, list[float]],
    *,
    title: str,
) -> None:
    """Two bars per variant on `ax`: `left` and `right` are (legend label, one value per name)."""
    xs = range(len(names))
    width = 0.4
    for offset, (label, values) in ((-width / 2, left), (width / 2, right)):
        ax.bar([x + offset for x in xs], values, width, label=label)
    ax.set_xticks(list(xs), names, rotation=25, fontsize=8)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")


def table(results: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| variant | mask | λ | B | held-out L_MDM | held-out L_AR | TPF | agreement with AR |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    ar = results["ar_start"]["eval"]
    lines.append(
        f"| AR start (no adaptation) | causal | 1 | 1 | {ar['heldout_mdm']:.3f} | "
        f"{ar['heldout_ar']:.3f} | {ar['tokens_per_forward']:.2f} | – |"
    )
    for name, entry in results["variants"].items():
        ev, hist = entry["eval"], entry["history"]
        sizes = [r["block_size"] for r in hist]
        growth = f"{sizes[0]}→{sizes[-1]}" if sizes[0] != sizes[-1] else f"{sizes[-1]}"
        lam = max(r["ar_weight"] for r in hist)
        agree = ev["agreement_with_ar"]
        lines.append(
            f"| {name} | {entry['mask_kind']} | {lam:g} | {growth} | {ev['heldout_mdm']:.3f} | "
            f"{ev['heldout_ar']:.3f} | {ev['tokens_per_forward']:.2f} | "
            f"{'–' if agree is None else f'{agree:.1%}'} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------- run


def _parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANT_SPECS]
    if unknown or not names:
        raise ConfigError(
            f"--variants {text!r}: unknown {unknown or 'empty list'}; choose from "
            f"{', '.join(VARIANTS)}"
        )
    return names


def run(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.monotonic()
    out = Path(args.out).resolve()
    names = _parse_variants(args.variants)
    config, extra = _config_and_overrides(args, out)
    base = load_config(config, extra)
    steps = args.steps or (DEFAULT_STEPS if args.config is None else base.train.steps)
    _say(f"nbdiff ablate: {len(names)} variant(s) x {steps} steps from one AR checkpoint -> {out}")
    ar_checkpoint = args.ar_checkpoint
    if ar_checkpoint is None:
        ar_checkpoint = _train_ar_start(args, config, extra, out)
    trained: dict[str, tuple[Any, Any]] = {}
    for name in names:
        spec = VARIANT_SPECS[name]
        cfg = load_config(
            config,
            [
                *extra,
                *variant_overrides(spec, base, steps),
                f"--checkpoint.load={ar_checkpoint}",
                "--checkpoint.finetune=true",
                f"--checkpoint.save={out / name}",
                f"--checkpoint.save_interval={steps}",
                "--checkpoint.keep_last=1",
            ],
        )
        _say(f"\n[{name}] {spec.label}: mask {spec.mask_kind}, {steps} steps")
        trained[name] = (cfg, _train(cfg, name))

    results: dict[str, Any] = {
        "command": "nbdiff " + " ".join(sys.argv[1:]),
        "steps": steps,
        "tokens_per_variant": steps * base.tokens_per_step(),
        "threshold": args.threshold,
        "ar_checkpoint": str(ar_checkpoint),
        "variants": {},
    }
    results.update(_evaluate_all(args, base, trained, str(ar_checkpoint), out))
    results["seconds"] = round(time.monotonic() - started, 1)
    if _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        png = draw(results, out / "ablation.png")
        print("\n" + table(results))
        print(f"\nresults {out / 'results.json'}\npicture {png}")
        print(f"done in {results['seconds'] / 60:.1f} min")
    destroy_parallel()
    return 0


def _say(*args: Any) -> None:
    """print on rank 0 only."""
    if _rank() == 0:
        print(*args)


def _config_and_overrides(args: argparse.Namespace, out: Path) -> tuple[str, list[str]]:
    """The config file and the overrides every training run gets: --config as given, or the
    bundled corpus (prepared under `out`) with examples/tiny_cpu.yaml."""
    extra = list(getattr(args, "overrides", None) or [])
    if args.config is not None:
        return args.config, extra
    if _rank() == 0:
        (out / "data" / "READY").unlink(missing_ok=True)
    prefix = _prepare_bundled(out, args.documents)
    extra = [
        f"--data.data_path=[{prefix}]",
        f"--data.tokenizer_model={bundled_tokenizer_path()}",
        f"--data.split={DEFAULT_SPLIT}",
        "--logging.log_interval=50",
        *extra,
    ]
    return str(EXAMPLE), extra


def _train_ar_start(args: argparse.Namespace, config: str, extra: list[str], out: Path) -> str:
    """Train the AR start model every variant adapts (B = 1, λ = 1); returns its checkpoint."""
    ar_cfg = load_config(
        config,
        [
            *extra,
            f"--train.steps={args.ar_steps}",
            "--curriculum.mask_kind=context_causal",
            "--curriculum.start_block_size=1",
            "--curriculum.target_block_size=1",
            "--curriculum.ar_weight=1.0",
            "--curriculum.ar_weight_final=null",
            "--curriculum.ar_weight_anneal=constant",
            f"--schedule.warmup_steps={min(20, args.ar_steps // 4)}",
            f"--schedule.decay_steps={max(0, min(args.ar_steps // 5, args.ar_steps - 20))}",
            f"--checkpoint.save={out / 'ar_start'}",
            f"--checkpoint.save_interval={args.ar_steps}",
            "--checkpoint.keep_last=1",
        ],
    )
    _say(f"\n[AR start] training the AR model: {args.ar_steps} steps, B = 1, λ = 1")
    return _train(ar_cfg, "AR").checkpoint


def _evaluate_all(
    args: argparse.Namespace,
    base: Any,
    trained: dict[str, tuple[Any, Any]],
    ar_checkpoint: str,
    out: Path,
) -> dict[str, Any]:
    """The results' `ar_start` and `variants` entries: every checkpoint evaluated on the same
    held-out data, noise and prompts."""
    tok = load_tokenizer(base.data.tokenizer_type, base.data.tokenizer_model)
    eval_cfg = _with_vocab(next(iter(trained.values()))[0], tok)
    data = held_out(eval_cfg, tok, args.eval_samples, args.eval_prompts, args.prompt_tokens)
    mask_id = base.noise.mask_token_id if base.noise.mask_token_id is not None else tok.mask_id
    _say(f"\n[eval] {data.x0.shape[0]} held-out samples, {len(data.prompts)} held-out prompts")
    common = dict(
        mask_id=int(mask_id),
        eos_ids=[tok.eod],
        max_new_tokens=args.max_new_tokens,
        threshold=args.threshold,
    )
    ar_eval, reference = evaluate(
        eval_cfg, ar_checkpoint, data, mask_kind="context_causal", reference=None, **common
    )
    variants: dict[str, Any] = {}
    for name, (cfg, result) in trained.items():
        ev, _ = evaluate(
            _with_vocab(cfg, tok),
            result.checkpoint,
            data,
            mask_kind=cfg.curriculum.mask_kind,
            reference=reference,
            **common,
        )
        variants[name] = {
            "label": VARIANT_SPECS[name].label,
            "mask_kind": cfg.curriculum.mask_kind,
            "checkpoint": result.checkpoint,
            "metrics": str(out / name / "metrics.jsonl"),
            "history": [
                {k: r[k] for k in ("step", "loss", "mdm", "ar", "block_size", "ar_weight")}
                for r in result.history
            ],
            "eval": ev,
        }
    return {"ar_start": {"eval": ar_eval}, "variants": variants}


def _with_vocab(cfg: Any, tok: Any) -> Any:
    """The config with the model section training resolved (vocabulary from the tokenizer, dtype)."""
    # lazy: megatron-core, which `nbdiff ablate --help` skips (module doc)
    from nbdiff_megatron.training.setup import model_config, resolve_precision

    return dataclasses.replace(cfg, model=model_config(cfg, tok, resolve_precision(cfg)))


__all__ = ["VARIANTS", "VARIANT_SPECS", "evaluate", "held_out", "run", "table", "variant_overrides"]
