"""Benchmark the NBDiff loss path: fused (kernels.nbdiff_linear_loss) vs reference (logits + nbdiff_loss).

Each mode runs in its own process (so that peaks do not mix) on one micro-batch of 2L rows, in the
layout of training under megatron DDP: the output weight has a ``main_grad`` buffer (DDP's fp32
gradient buffer) and autograd's weight gradient is added into it by a hook and dropped, as DDP's
per-parameter hook does.

- baseline  : hidden states [1, 2L, h], the output weight [V, h], hidden.grad and weight.main_grad;
- reference : logits = hidden @ weight.T, then method.losses.nbdiff_loss, backward;
- fused     : kernels.nbdiff_linear_loss(..., accumulate_into_main_grad=True) -- what training runs:
              d W goes straight into main_grad (megatron's gradient-accumulation fusion);
- fused_autograd : the same kernel handing d W to autograd (a [V, h] gradient, then the hook).

with per-sequence t = 0.5, token shift, λ = 0.5. It prints the peak memory of each mode above the
baseline (CPU: peak RSS; GPU: torch.cuda.max_memory_allocated) and the forward + backward time
(best of --repeats), and the ratios fused / reference.

CPU (the issue's figures):  python benchmarks/loss.py --threads 2  (V = 151,936, h = 1,024, 2L = 2,048, fp32)
GPU:                        python benchmarks/loss.py --device cuda --hidden 4096 --length 8192 --dtype bf16
Quick check:                python benchmarks/loss.py --vocab 4096 --hidden 64 --length 128 --repeats 1
A padded TP shard (the last of 4 ranks for V = 153,377: 38,177 real rows of 38,400), projected
over its real rows or, with --project-padded, over all of them:
                            python benchmarks/loss.py ... --vocab 38177 --padded-vocab 38400 [--project-padded]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("baseline", "reference", "fused", "fused_autograd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument(
        "--padded-vocab",
        type=int,
        default=0,
        help="rows of the output weight (a TP shard padded past --vocab real ones; 0: --vocab)",
    )
    parser.add_argument(
        "--project-padded",
        action="store_true",
        help="fused: project all --padded-vocab rows, padding masked (loss.fused_padded_projection)",
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--length", type=int, default=1024, help="L (the model sees 2L rows)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--mode", choices=MODES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def _peak(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_mode(args: argparse.Namespace) -> dict:
    from nbdiff_megatron.kernels import nbdiff_linear_loss
    from nbdiff_megatron.method.losses import nbdiff_loss
    from nbdiff_megatron.method.noise import mask_tokens

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    length, vocab = args.length, args.vocab
    x0 = torch.randint(0, vocab - 1, (1, length), generator=gen)
    _, masked = mask_tokens(
        x0, torch.tensor([0.5]), block_size=32, mask_id=vocab - 1, token_shift=True, generator=gen
    )
    x0, masked = x0.to(device), masked.to(device)
    t = torch.full((1,), 0.5, device=device)
    hidden = torch.randn(1, 2 * length, args.hidden, generator=gen).to(device, dtype)
    rows = max(args.padded_vocab, vocab)
    weight = (torch.randn(rows, args.hidden, generator=gen) * 0.02).to(device, dtype)
    hidden.requires_grad_()
    weight.requires_grad_()
    hidden.grad = torch.zeros_like(hidden)
    weight.main_grad = torch.zeros_like(weight, dtype=torch.float32)

    def ddp_hook(param: torch.Tensor) -> None:  # megatron DDP: add to main_grad, drop .grad
        if param.grad is not None:
            param.main_grad.add_(param.grad)
        param.grad = None

    weight.register_post_accumulate_grad_hook(ddp_hook)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    kwargs = dict(ar_weight=0.5, token_shift=True, validate=False)
    for _ in range(args.repeats if args.mode != "baseline" else 0):
        start = time.perf_counter()
        if args.mode == "reference":
            terms = nbdiff_loss(hidden @ weight[:vocab].t(), x0, masked, t, **kwargs)
        else:
            terms = nbdiff_linear_loss(
                hidden,
                weight,
                x0,
                masked,
                t,
                accumulate_into_main_grad=args.mode == "fused",
                vocab_size=vocab,
                project_padded=args.project_padded,
                **kwargs,
            )
        terms.total.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del terms
    return dict(
        mode=args.mode, peak_bytes=_peak(args.device), seconds=min(times) if times else None
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode is not None:
        print(json.dumps(run_mode(args)))
        return 0
    forwarded = [
        f"--vocab={args.vocab}",
        f"--padded-vocab={args.padded_vocab}",
        *(["--project-padded"] if args.project_padded else []),
        f"--hidden={args.hidden}",
        f"--length={args.length}",
        f"--dtype={args.dtype}",
        f"--device={args.device}",
        f"--repeats={args.repeats}",
        f"--threads={args.threads}",
    ]
    results = {}
    for mode in MODES:
        proc = subprocess.run(
            [sys.executable, __file__, *forwarded, "--mode", mode],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = results["baseline"]["peak_bytes"]
    ref, fused, plain = results["reference"], results["fused"], results["fused_autograd"]
    ref_extra, fused_extra = ref["peak_bytes"] - base, fused["peak_bytes"] - base
    plain_extra = plain["peak_bytes"] - base
    summary = dict(
        machine=f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
        if args.device == "cpu"
        else torch.cuda.get_device_name(),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        vocab=args.vocab,
        weight_rows=max(args.padded_vocab, args.vocab),
        project_padded=args.project_padded,
        hidden=args.hidden,
        rows=2 * args.length,
        dtype=args.dtype,
        baseline_gib=base / 2**30,
        reference_extra_gib=ref_extra / 2**30,
        fused_extra_gib=fused_extra / 2**30,
        memory_ratio=fused_extra / max(ref_extra, 1),
        reference_s=ref["seconds"],
        fused_s=fused["seconds"],
        time_ratio=fused["seconds"] / ref["seconds"],
        fused_autograd_extra_gib=plain_extra / 2**30,
        fused_autograd_s=plain["seconds"],
    )
    print(
        f"loss path, V={args.vocab:,} h={args.hidden:,} 2L={2 * args.length:,} {args.dtype} on "
        f"{args.device} ({summary['machine']}, {summary['date']})\n"
        f"  baseline (hidden + weight + grad buffers): {summary['baseline_gib']:.2f} GiB peak\n"
        f"  reference: +{summary['reference_extra_gib']:.2f} GiB, {ref['seconds']:.2f} s fwd+bwd\n"
        f"  fused:     +{summary['fused_extra_gib']:.2f} GiB, {fused['seconds']:.2f} s fwd+bwd\n"
        f"  fused, d W through autograd: +{plain_extra / 2**30:.2f} GiB, "
        f"{plain['seconds']:.2f} s fwd+bwd\n"
        f"  fused / reference: memory {summary['memory_ratio']:.1%}, time {summary['time_ratio']:.2f}x"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
