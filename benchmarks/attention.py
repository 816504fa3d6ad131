"""Benchmark NBDiff attention on a GPU: FlexAttention with the x_t ⊕ x_0 BlockMask vs causal attention.

For each L it times forward + backward of NBDiffAttention (the module the model uses, q/k/v in megatron's
[s, b, heads, d] layout) on:

- nbdiff/flex   : 2L tokens, the context-causal training mask (docs/METHOD.md §3), BlockMask from the mask_mod;
- causal/flex   : L tokens, causal BlockMask (what AR training of the same model costs with flex);
- causal/sdpa   : L tokens, SDPA is_causal (flash / cuDNN kernels: the AR baseline's best case);

and prints the ratios nbdiff/flex over each causal run, the BlockMask build time (miss) and a cache hit.

Run on a GPU:  python benchmarks/attention.py            (L = 4096, 8192; B = 32; bf16)
               python benchmarks/attention.py --lengths 4096 --batch 8 --heads 16 --kv-heads 4
On a CPU it refuses (FlexAttention has no CPU backward) unless --cpu-smoke, which runs a tiny forward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nbdiff_megatron  # noqa: E402  (the repository, put on the path above)

nbdiff_megatron.install_compat()  # as the `nbdiff` command does, before model.attention imports megatron-core

from nbdiff_megatron.method.masks import training_mask, training_mask_mod  # noqa: E402
from nbdiff_megatron.model.attention import (  # noqa: E402
    AttentionMask,
    BlockMaskCache,
    NBDiffAttention,
    build_block_mask,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[4096, 8192],
        help="L values (the NBDiff forward runs on 2L tokens)",
    )
    parser.add_argument("--batch", type=int, default=32, help="batch size b")
    parser.add_argument("--heads", type=int, default=32, help="query heads (per TP rank)")
    parser.add_argument("--kv-heads", type=int, default=8, help="key/value heads (GQA)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=32, help="NBDiff block size B")
    parser.add_argument(
        "--kind", default="context_causal", choices=["context_causal", "block_causal"]
    )
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="on a CPU: tiny forward-only run that checks the script, no timings",
    )
    return parser.parse_args(argv)


def _module(heads: int, kv_heads: int, head_dim: int, device: str) -> NBDiffAttention:
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        kv_channels=head_dim,
        attention_dropout=0.0,
        use_cpu_initialization=device == "cpu",
    )
    return NBDiffAttention(config, layer_number=1).to(device)


def _qkv(seq: int, args: argparse.Namespace, dtype: torch.dtype, device: str):
    shape_q = (seq, args.batch, args.heads, args.head_dim)
    shape_kv = (seq, args.batch, args.kv_heads, args.head_dim)
    return (
        torch.randn(shape_q, dtype=dtype, device=device, requires_grad=True),
        torch.randn(shape_kv, dtype=dtype, device=device, requires_grad=True),
        torch.randn(shape_kv, dtype=dtype, device=device, requires_grad=True),
    )


def _time_fwd_bwd(attn: NBDiffAttention, q, k, v, mask, warmup: int, iters: int) -> float:
    """Median milliseconds of one forward + backward."""
    grad_out = None
    times = []
    for step in range(warmup + iters):
        for t in (q, k, v):
            t.grad = None
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        out = attn(q, k, v, mask)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        out.backward(grad_out)
        end.record()
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def cpu_smoke(args: argparse.Namespace) -> int:
    length, block = 32, 4
    small = argparse.Namespace(
        **{**vars(args), "batch": 2, "heads": 4, "kv_heads": 2, "head_dim": 16}
    )
    attn = _module(4, 2, 16, "cpu").eval()
    q, k, v = (t.detach() for t in _qkv(2 * length, small, torch.float32, "cpu"))
    cache = BlockMaskCache()
    key = ("nbdiff", args.kind, length, block)
    start = time.perf_counter()
    block_mask = cache.get(
        key,
        lambda: build_block_mask(
            training_mask_mod(length, block, args.kind), None, 2 * length, 2 * length, "cpu"
        ),
    )
    build_s = time.perf_counter() - start
    cache.get(key, lambda: None)
    flex = attn(q, k, v, AttentionMask.flex(block_mask))
    dense = attn(q, k, v, AttentionMask.dense(training_mask(length, block, args.kind)))
    diff = (flex - dense).abs().max().item()
    print(
        f"CPU smoke run (no timings): L={length} B={block}; flex vs sdpa max |diff| = {diff:.2e}; "
        f"BlockMask build {build_s * 1e3:.1f} ms; cache hits={cache.hits} misses={cache.misses}"
    )
    return 0 if diff <= 1e-5 else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        if args.cpu_smoke:
            return cpu_smoke(args)
        print(
            "benchmarks/attention.py needs a CUDA GPU (FlexAttention has no backward on CPU and "
            "CPU timings say nothing about the cluster). Run it on a GPU machine, or pass "
            "--cpu-smoke to check the script on a tiny input."
        )
        return 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = "cuda"
    attn = _module(args.heads, args.kv_heads, args.head_dim, device).train()
    cache = BlockMaskCache()
    print(
        f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype={args.dtype} "
        f"b={args.batch} heads={args.heads} kv_heads={args.kv_heads} d={args.head_dim} "
        f"B={args.block_size} kind={args.kind}; fwd+bwd median of {args.iters} (ms)"
    )
    header = (
        f"{'L':>6} {'nbdiff/flex 2L':>15} {'causal/flex L':>14} {'causal/sdpa L':>14} "
        f"{'ratio vs flex':>13} {'ratio vs sdpa':>13} {'blocks run %':>12} "
        f"{'mask build ms':>13} {'cache hit ms':>12} {'hits/miss':>9}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for length in args.lengths:
        key = ("nbdiff", args.kind, length, args.block_size, None, None, device)
        torch.cuda.synchronize()
        start = time.perf_counter()
        nbdiff_mask = cache.get(
            key,
            lambda length=length: build_block_mask(
                training_mask_mod(length, args.block_size, args.kind),
                None,
                2 * length,
                2 * length,
                device,
            ),
        )
        torch.cuda.synchronize()
        build_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        again = cache.get(key, lambda: None)
        hit_ms = (time.perf_counter() - start) * 1e3
        assert again is nbdiff_mask
        causal_mask = build_block_mask(_causal_mask_mod, None, length, length, device)

        q, k, v = _qkv(2 * length, args, dtype, device)
        nbdiff_ms = _time_fwd_bwd(
            attn, q, k, v, AttentionMask.flex(nbdiff_mask), args.warmup, args.iters
        )
        del q, k, v
        q, k, v = _qkv(length, args, dtype, device)
        flex_causal_ms = _time_fwd_bwd(
            attn, q, k, v, AttentionMask.flex(causal_mask), args.warmup, args.iters
        )
        sdpa_causal_ms = _time_fwd_bwd(attn, q, k, v, None, args.warmup, args.iters)
        del q, k, v
        torch.cuda.empty_cache()
        row = (
            f"{length:>6} {nbdiff_ms:>15.2f} {flex_causal_ms:>14.2f} {sdpa_causal_ms:>14.2f} "
            f"{nbdiff_ms / flex_causal_ms:>13.2f} {nbdiff_ms / sdpa_causal_ms:>13.2f} "
            f"{100.0 - float(nbdiff_mask.sparsity()):>12.1f} {build_ms:>13.1f} "
            f"{hit_ms:>12.3f} {cache.hits:>4}/{cache.misses:<4}"
        )
        print(row, flush=True)
        rows.append(row)
    print(
        "ratio = NBDiff step on x_t ⊕ x_0 (2L tokens) / causal step on L tokens; the dense-equivalent "
        "cost of 2L tokens is 4x. blocks run % = BlockMask tiles not skipped (of the 2L x 2L grid)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
