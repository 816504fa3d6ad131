"""Preprocessing throughput on the bundled corpus with 1 and 2 (or more) tokenizing workers.

    python benchmarks/preprocess.py [--workers 1 2] [--repeats 2]

Prints a table of documents, tokens, seconds and tokens/s (best of --repeats runs per worker
count), with the machine and date. Output files go to a temporary folder.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from nbdiff_megatron.data.bundled import (
        BUNDLED_TOKENIZER_TYPE,
        bundled_corpus_path,
        bundled_tokenizer_path,
    )
    from nbdiff_megatron.data.preprocess import preprocess

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            best = None
            for r in range(args.repeats):
                t0 = time.perf_counter()
                summary = preprocess(
                    [bundled_corpus_path()],
                    os.path.join(tmp, f"w{workers}_{r}"),
                    BUNDLED_TOKENIZER_TYPE,
                    bundled_tokenizer_path(),
                    append_eod=True,
                    workers=workers,
                    progress=False,
                )
                seconds = time.perf_counter() - t0  # wall time including pool start-up
                if best is None or seconds < best[0]:
                    best = (seconds, summary)
            seconds, summary = best
            rows.append((workers, summary.documents, summary.tokens, seconds))

    print(
        f"# preprocess benchmark, {datetime.date.today()}, {platform.node()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}"
    )
    print("| workers | documents | tokens | seconds | tokens/s | docs/s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for workers, docs, tokens, seconds in rows:
        print(
            f"| {workers} | {docs} | {tokens} | {seconds:.2f} | {tokens / seconds:,.0f} | "
            f"{docs / seconds:,.0f} |"
        )


if __name__ == "__main__":
    main()
