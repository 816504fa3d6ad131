"""Benchmark decoding: block diffusion (KV cache, parallel unmasking) vs the AR decoder of the same model.

For each threshold of the confidence rule, and then per other unmasking rule (static and dynamic
schedules, entropy-bounded, margin, entropy, top-k), it reports, per batch size, the forward passes
(NFE), the tokens per forward (TPF, hardware independent) and tokens/s, with the speed-up over AR
decoding (the same weights, KV cache, one token per forward), for two block decoders: "rel", the NBDiff
release's schedule (a commit forward per block, `--no-fused-commit`), and "fused", the default (the
commit fused with the next block's first step; "agree" is the share of tokens equal to "rel": 1.000). The sub-block cache (approximate) gets a
row beside the exact decoder with the same sub-blocks, with the share of tokens that agree with it.
Greedy decoding, EOS ignored, so every run generates exactly `--max-new-tokens` tokens per prompt.

Models:
    --load CKPT            a trained checkpoint (the demo model: `nbdiff demo` writes runs/tiny)
    --random tiny          a random 2-layer / 64-wide model (CPU smoke; random weights: TPF ~ 1)
    --random 1b            a random ~1.1B Llama-shaped model (22 layers, hidden 2048, GQA 32/4, vocab
                           32000); meant for `--device cuda` (bf16)

    python benchmarks/decode.py --load runs/tiny --thresholds 0.7 0.8 0.9 1.0
    python benchmarks/decode.py --random 1b --device cuda --batch-sizes 1 8 --max-new-tokens 256

Random weights give flat predictions, so confidence rarely passes a threshold and TPF stays near 1: with
--random the table measures the cost of the forwards, not the parallelism a trained model allows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbdiff_megatron import install_compat  # noqa: E402  (the repository, put on the path above)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RANDOM_CONFIGS = {
    "tiny": dict(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=256,
        num_attention_heads=4,
        num_query_groups=2,
        seq_length=512,
        vocab_size=4096,
    ),
    "1b": dict(
        num_layers=22,
        hidden_size=2048,
        ffn_hidden_size=5632,
        num_attention_heads=32,
        num_query_groups=4,
        seq_length=2048,
        vocab_size=32000,
        make_vocab_size_divisible_by=128,
    ),
}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model a decoding benchmark runs (`load_model` reads them): a checkpoint or a random shape."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="checkpoint (megatron-core or HF folder)")
    src.add_argument("--random", choices=sorted(RANDOM_CONFIGS), help="random-init model")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--dtype", default=None, choices=("fp32", "bf16"), help="default: bf16 on cuda, fp32 on cpu"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(p)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.7, 0.8, 0.9, 1.0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--block-size", type=int, default=None, help="default: the checkpoint's (or 32)")
    p.add_argument("--sub-block-size", type=int, default=None)
    p.add_argument("--block-align", default="document", choices=("document", "prompt"))
    p.add_argument(
        "--no-rules", action="store_true", help="only the confidence thresholds (no rule rows)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (tokens)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per setting (best is kept)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument(
        "--skip-documents",
        type=int,
        default=0,
        help="take prompts after the first N bundled documents (held-out text: the demo trains on "
        "the first 2)",
    )
    return p.parse_args(argv)


def load_model(args: argparse.Namespace):
    """(model, mask_id, block_size, token_shift, prompt ids source)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    if args.device == "cpu" and torch.cuda.is_available():
        raise SystemExit(
            "this benchmark builds on the GPU when one is visible: use --device cuda "
            "(or hide it with CUDA_VISIBLE_DEVICES=)"
        )
    if args.load:
        from nbdiff_megatron.inference.loading import load_for_inference

        loaded = load_for_inference(args.load, params_dtype=args.dtype)
        tok = loaded.tokenizer
        return loaded.model, loaded.mask_id, loaded.block_size, loaded.token_shift, tok
    from nbdiff_megatron.model.builder import build_model
    from nbdiff_megatron.model.config import ModelConfig

    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    cfg = ModelConfig(**RANDOM_CONFIGS[args.random], params_dtype=dtype, attention_backend="sdpa")
    model = build_model(cfg, seed=0)
    model.eval()
    return model, cfg.vocab_size - 1, 32, True, None


def make_prompts(
    tok, batch: int, length: int, vocab: int, mask_id: int, skip: int = 0
) -> list[list[int]]:
    """`batch` prompts of `length` tokens: bundled-corpus text with a tokenizer (after the first
    `skip` documents), else random ids."""
    if tok is not None:
        from nbdiff_megatron.data.bundled import iter_bundled_documents

        ids: list[int] = []
        for index, doc in enumerate(iter_bundled_documents()):
            if index < skip:
                continue
            ids.extend(tok.encode(doc["text"]))
            if len(ids) >= batch * length * 4:
                break
        stride = max(1, (len(ids) - length) // max(batch, 1))
        return [ids[i * stride : i * stride + length] for i in range(batch)]
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(1, mask_id, (batch, length), generator=gen)
    return rows.tolist()


def timed(decoder, prompts, repeats: int, **options):
    best = None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out = decoder.generate(prompts, **options)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if best is None or out.stats.seconds < best.stats.seconds:
            best = out
    return best


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_compat()  # as the nbdiff command: megatron-core's CPU patches, its import notices dropped
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    from nbdiff_megatron.inference import ARDecoder, BlockDecoder, UnmaskingConfig

    t0 = time.perf_counter()
    model, mask_id, block, token_shift, tok = load_model(args)
    block = args.block_size or block
    cfg = model.nbdiff_config
    print(
        f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.params_dtype}, built in "
        f"{time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    prompt_len = min(args.prompt_tokens, cfg.seq_length - args.max_new_tokens)
    if prompt_len < 1:
        raise SystemExit("--max-new-tokens leaves no room for a prompt in the model's context")
    common = dict(max_new_tokens=args.max_new_tokens, stop_at_eos=False)
    ar = ARDecoder(model, mask_id=mask_id, **common)
    blockdec = BlockDecoder(
        model,
        mask_id=mask_id,
        block_size=block,
        sub_block_size=args.sub_block_size,
        token_shift=token_shift,
        block_align=args.block_align,
        **common,
    )
    sub = args.sub_block_size or max(block // 4, 1)
    rules = (
        []
        if args.no_rules
        else [
            ("static S=B/2", UnmaskingConfig("static", steps=max(block // 2, 1))),
            ("static S=B/4", UnmaskingConfig("static", steps=max(block // 4, 1))),
            ("dynamic .9 S=B/4", UnmaskingConfig("dynamic", 0.9, steps=max(block // 4, 1))),
            ("entropy_bnd 1.0", UnmaskingConfig("entropy_bounded", 1.0)),
            ("margin 0.5", UnmaskingConfig("margin", 0.5)),
            ("entropy 1.0", UnmaskingConfig("entropy", 1.0)),
            ("topk k=2", UnmaskingConfig("topk", k=2)),
        ]
    )
    name = f"block{block}" + (f"/{args.sub_block_size}" if args.sub_block_size else "")
    rows = []
    for batch in args.batch_sizes:
        prompts = make_prompts(tok, batch, prompt_len, cfg.vocab_size, mask_id, args.skip_documents)
        blockdec.generate(prompts, max_new_tokens=min(args.max_new_tokens, 2 * block))  # warm-up
        ar.generate(prompts, max_new_tokens=4)
        base = timed(ar, prompts, args.repeats)
        rows.append(
            dict(
                batch=batch,
                decoder="ar",
                rule=None,
                **base.stats.as_dict(),
                speedup=1.0,
                agree=None,
            )
        )

        def row(label, out, decoder=name, agree=None, batch=batch, base=base):
            rows.append(
                dict(
                    batch=batch,
                    decoder=decoder,
                    rule=label,
                    **out.stats.as_dict(),
                    speedup=out.stats.tokens_per_second / base.stats.tokens_per_second,
                    agree=agree,
                )
            )

        def release_and_fused(label, unmasking, prompts=prompts):
            # the release's schedule (a commit forward per block) and the fused commit: the same
            # tokens (agreement 1.000), fewer forwards
            release = timed(
                blockdec, prompts, args.repeats, unmasking=unmasking, fused_commit=False
            )
            fused = timed(blockdec, prompts, args.repeats, unmasking=unmasking)
            same = sum(a == b for x, y in zip(release.tokens, fused.tokens) for a, b in zip(x, y))
            total = sum(len(x) for x in release.tokens)
            row(label, release, decoder=f"{name} rel")
            row(label, fused, decoder=f"{name} fused", agree=same / max(total, 1))

        for threshold in args.thresholds:
            release_and_fused(f"conf {threshold:.2f}", UnmaskingConfig("confidence", threshold))
        for label, unmasking in rules:
            release_and_fused(label, unmasking)
        if not args.no_rules and sub < block:
            # sub-block cache: approximate; agreement = share of tokens equal to the exact decoder's
            options = dict(sub_block_size=sub, unmasking=UnmaskingConfig("confidence", 0.9))
            exact = timed(blockdec, prompts, args.repeats, **options)
            cached = timed(blockdec, prompts, args.repeats, sub_block_cache=True, **options)
            same = sum(a == b for x, y in zip(exact.tokens, cached.tokens) for a, b in zip(x, y))
            total = sum(len(x) for x in exact.tokens)
            row("conf 0.90", exact, decoder=f"block{block}/{sub}")
            row("conf 0.90", cached, decoder=f"+subcache/{sub}", agree=same / max(total, 1))
    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(
        f"# decode benchmark, {datetime.date.today()}, {device}, torch {torch.__version__}; "
        f"prompt {prompt_len} tokens, {args.max_new_tokens} new tokens, greedy, "
        f"{args.block_align}-aligned blocks, "
        f"{'model ' + str(args.load) if args.load else 'random ' + args.random}"
    )
    header = (
        f"{'batch':>5} {'decoder':<13} {'rule':<17} {'NFE':>5} {'TPF':>6} {'tok/s':>9} "
        f"{'vs AR':>6} {'agree':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        rule = r["rule"] or "-"
        agree = "-" if r["agree"] is None else f"{r['agree']:.3f}"
        print(
            f"{r['batch']:>5} {r['decoder']:<13} {rule:<17} {r['nfe']:>5} {r['tpf']:>6.2f} "
            f"{r['tokens_per_s']:>9.1f} {r['speedup']:>5.2f}x {agree:>6}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
