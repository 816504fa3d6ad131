"""Benchmark a full batch: decoding many prompts `--batch-size` at a time, in fixed batches (each batch
runs until its slowest prompt stops; `nbdiff generate --no-refill`) and with refilling (a prompt that
stops hands its slot to the next waiting one; the default).

Prompts have mixed lengths (uniform in `--prompt-tokens MIN MAX`) and stop after a mixed number of
tokens: each prompt's stop length is drawn uniformly from 4..`--max-new-tokens` and applied by the
decoder's stop function after each block (as EOS or a stop string ends a row in real use; a random
model almost never draws its EOS). Greedy confidence-threshold decoding. Both modes decode the same
prompts in the same process; the report gives tokens/s, NFE and whether every prompt's tokens and stop
reason are equal in the two modes (they must be).

    python benchmarks/decode_batch.py --random tiny --prompts 64 --batch-size 8
    python benchmarks/decode_batch.py --load runs/demo/nbdiff --prompts 64 --batch-size 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import add_model_arguments, load_model  # noqa: E402  (the sibling benchmark's model setup)

from nbdiff_megatron import install_compat  # noqa: E402  (on the path since `decode` is imported)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(p)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, nargs=2, default=(8, 64), metavar=("MIN", "MAX"))
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--block-size", type=int, default=None, help="default: the checkpoint's (or 32)")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs per mode, alternating (best is kept)"
    )
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    return p.parse_args(argv)


def workload(args: argparse.Namespace, mask_id: int) -> tuple[list, list[int]]:
    """(prompts, stop length per prompt), seeded."""
    gen = torch.Generator().manual_seed(0)
    low, high = args.prompt_tokens
    lengths = torch.randint(low, high + 1, (args.prompts,), generator=gen).tolist()
    prompts = [torch.randint(1, mask_id, (n,), generator=gen).tolist() for n in lengths]
    stops = torch.randint(4, args.max_new_tokens + 1, (args.prompts,), generator=gen).tolist()
    return prompts, stops


def decode(decoder, prompts, stops, batch_size: int, refill: bool):
    """One pass over every prompt: fixed batches (one generate call each) or one refilling call."""
    from nbdiff_megatron.inference.refinement import DecodeStats

    def stop(row: int, ids: list[int], first: int = 0) -> bool:
        return len(ids) >= stops[first + row]

    if refill:
        out = decoder.generate(prompts, stop=stop, batch_size=batch_size)
        return out.tokens, out.stop_reasons, out.stats
    tokens, reasons, total = [], [], DecodeStats()
    for first in range(0, len(prompts), batch_size):
        out = decoder.generate(
            prompts[first : first + batch_size],
            stop=lambda row, ids, first=first: stop(row, ids, first),
            row_ids=range(first, first + len(prompts[first : first + batch_size])),
        )
        tokens += out.tokens
        reasons += out.stop_reasons
        for name in ("forward_passes", "generated_tokens", "row_forward_passes", "seconds"):
            setattr(total, name, getattr(total, name) + getattr(out.stats, name))
    return tokens, reasons, total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_compat()  # as the nbdiff command: megatron-core's CPU patches, its import notices dropped
    from nbdiff_megatron.inference import BlockDecoder
    from nbdiff_megatron.inference.refinement import unmasking_config

    model, mask_id, block_size, token_shift, _ = load_model(args)
    decoder = BlockDecoder(
        model,
        mask_id=mask_id,
        block_size=args.block_size or block_size,
        token_shift=token_shift,
        max_new_tokens=args.max_new_tokens,
        unmasking=unmasking_config(None, args.threshold),
    )
    prompts, stops = workload(args, mask_id)
    decode(decoder, prompts[: args.batch_size], stops, args.batch_size, True)  # warm-up
    # the modes alternate, so that a shared machine's load changes hit both alike; best run kept
    best: dict[bool, tuple] = {}
    for _ in range(args.repeats):
        for refill in (False, True):
            cpu = time.process_time()
            result = decode(decoder, prompts, stops, args.batch_size, refill)
            result = (*result, time.process_time() - cpu)
            if refill not in best or result[2].seconds < best[refill][2].seconds:
                best[refill] = result
    rows, outputs = [], {}
    for refill in (False, True):
        tokens, reasons, stats, cpu_seconds = best[refill]
        outputs[refill] = (tokens, reasons)
        rows.append(
            {
                "mode": "refill" if refill else "fixed batches",
                "prompts": len(prompts),
                "batch": args.batch_size,
                "tokens": stats.generated_tokens,
                "nfe": stats.forward_passes,
                "seconds": round(stats.seconds, 3),
                "cpu_seconds": round(cpu_seconds, 3),
                "tokens_per_s": round(stats.generated_tokens / stats.seconds, 1),
            }
        )
    equal = outputs[False] == outputs[True]
    print("| mode | prompts | batch | tokens | NFE | seconds | CPU seconds | tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['mode']} | {r['prompts']} | {r['batch']} | {r['tokens']} | {r['nfe']} | "
            f"{r['seconds']} | {r['cpu_seconds']} | {r['tokens_per_s']} |"
        )
    speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(f"refill / fixed: {speedup:.2f}x tokens/s; outputs equal: {equal}")
    if args.json:
        meta = {
            "date": datetime.date.today().isoformat(),
            "machine": platform.platform(),
            "cpus": torch.get_num_threads(),
            "args": vars(args),
            "outputs_equal": equal,
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
