"""Best-fit-decreasing packing: the C++ extension against the pure-Python fallback.

    python benchmarks/packing.py [--samples 1000000] [--capacity 4096]

Packs N document lengths (log-normal, median ~150 tokens, capped at the capacity, like chat
conversations) into sequences of `capacity` tokens with both backends, checks that they agree, and
prints a table with the speed-up. Also times the per-sample document-id computation over N rows of
256 tokens (C++ loop vs numpy cumsum).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import numpy as np


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from nbdiff_megatron.data.packing import (
        cpp_extension_available,
        doc_ids_from_eod_batch,
        pack_best_fit_decreasing,
    )

    if not cpp_extension_available():
        raise SystemExit(
            "the C++ extension is not built: pip install -e . (needs a C++17 compiler)"
        )
    rng = np.random.default_rng(args.seed)
    lengths = np.clip(rng.lognormal(5.0, 1.0, size=args.samples).astype(np.int64), 1, args.capacity)
    t_cpp, cpp = best_time(
        lambda: pack_best_fit_decreasing(lengths, args.capacity, backend="cpp"), args.repeats
    )
    t_py, py = best_time(
        lambda: pack_best_fit_decreasing(lengths, args.capacity, backend="python"),
        max(1, args.repeats - 2),
    )
    assert np.array_equal(cpp.item_order, py.item_order)
    assert np.array_equal(cpp.bin_offsets, py.bin_offsets)
    fill = lengths.sum() / (cpp.num_bins * args.capacity)

    eod = 0
    rows = min(args.samples, 1_000_000)
    tokens = rng.integers(0, 50, size=(rows, 256), dtype=np.int64)
    t_ids_cpp, ids_cpp = best_time(lambda: doc_ids_from_eod_batch(tokens, eod, "cpp"), args.repeats)
    t_ids_np, ids_np = best_time(
        lambda: doc_ids_from_eod_batch(tokens, eod, "python"), args.repeats
    )
    assert np.array_equal(ids_cpp, ids_np)

    print(
        f"# packing benchmark, {datetime.date.today()}, {platform.node()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(
        f"# {args.samples} documents (log-normal lengths, mean {lengths.mean():.0f}) into "
        f"{args.capacity}-token sequences: {cpp.num_bins} sequences, fill {fill:.4f}; "
        "results identical"
    )
    print("| task | C++ s | Python s | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    print(
        f"| best-fit-decreasing, {args.samples} docs | {t_cpp:.3f} | {t_py:.3f} | "
        f"{t_py / t_cpp:.1f}x |"
    )
    print(
        f"| doc ids from EOD, {rows} x 256 (Python = numpy) | {t_ids_cpp:.3f} | "
        f"{t_ids_np:.3f} | {t_ids_np / t_ids_cpp:.1f}x |"
    )


if __name__ == "__main__":
    main()
