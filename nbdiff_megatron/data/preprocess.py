"""`nbdiff preprocess`: tokenize text into Megatron indexed datasets (Megatron's flag names).

Writes `{output_prefix}_{key}_document.bin/.idx` for each `--json-keys` key through megatron-core's
`IndexedDatasetBuilder` (so its `IndexedDataset` and `GPTDataset` read them), plus a sidecar
`{output_prefix}_{key}_document.json` with the tokenizer metadata (type, model, vocab size, EOD, mask
id) and the counts.

Bad records (malformed JSON, missing keys, empty documents, invalid UTF-8, missing or unreadable
files) are skipped and reported with file:line, counted per reason in the summary and listed in full in
`{output_prefix}_skipped.txt`; `--strict` stops at the first one with a DataError and leaves no
output behind. Outputs are written to temporary names and renamed only when complete.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np

from nbdiff_megatron.data.readers import (
    INPUT_FORMATS,
    Problem,
    RawRecord,
    expand_inputs,
    iter_records,
)
from nbdiff_megatron.data.tokenizer import (
    TOKENIZER_TYPES,
    Tokenizer,
    canonical_tokenizer_type,
    load_tokenizer,
    tokenizer_metadata,
)
from nbdiff_megatron.errors import DataError

CHUNK_RECORDS = 256
SIDECAR_VERSION = 1


@dataclass
class PreprocessSummary:
    """What a preprocessing run produced and what it skipped."""

    documents: int = 0
    tokens: int = 0
    skipped: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)
    output_prefixes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def format(self, max_problems: int = 10) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"documents written: {self.documents}",
            f"tokens written:    {self.tokens} ({rate:,.0f} tokens/s over {self.seconds:.1f} s)",
            f"records skipped:   {sum(self.skipped.values())}",
        ]
        lines += [f"  {reason}: {n}" for reason, n in sorted(self.skipped.items())]
        for problem in self.problems[:max_problems]:
            lines.append(f"  skipped {problem}")
        if len(self.problems) > max_problems:
            lines.append(f"  ... and {len(self.problems) - max_problems} more (see *_skipped.txt)")
        lines += [
            f"output [{key}]: {prefix}.bin/.idx" for key, prefix in self.output_prefixes.items()
        ]
        return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Megatron-LM's tools/preprocess_data.py flags, plus --strict and --input-format."""
    group = parser.add_argument_group("input")
    group.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="JSONL (.jsonl/.jsonl.gz), parquet or .txt files, globs or folders",
    )
    group.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="keys (parquet columns) to tokenize; one dataset per key",
    )
    group.add_argument(
        "--input-format",
        choices=INPUT_FORMATS,
        default="auto",
        help="override the format guessed from the file name",
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-type", required=True, help=f"one of {', '.join(TOKENIZER_TYPES)}"
    )
    group.add_argument(
        "--tokenizer-model",
        required=True,
        help="tokenizer.json, HF tokenizer folder, sentencepiece .model or tiktoken file",
    )
    group.add_argument(
        "--append-eod",
        action="store_true",
        help="append the end-of-document token to every document",
    )
    group = parser.add_argument_group("output")
    group.add_argument(
        "--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx/.json"
    )
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    group.add_argument(
        "--log-interval", type=int, default=1000, help="refresh the progress line every N documents"
    )
    group.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first bad record (DataError) instead of skipping it",
    )
    group.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    summary = preprocess(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        workers=args.workers,
        log_interval=args.log_interval,
        strict=args.strict,
        input_format=args.input_format,
        progress=not args.quiet,
    )
    print(summary.format())
    return 0


def output_prefix_for(output_prefix: str, key: str) -> str:
    """The indexed-dataset prefix (without .bin/.idx) written for one json key."""
    return f"{output_prefix}_{key}_document"


def read_sidecar(dataset_prefix: str) -> dict[str, Any] | None:
    """The metadata `nbdiff preprocess` wrote beside an indexed dataset, or None if absent."""
    path = dataset_prefix + ".json"
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def preprocess(
    inputs: list[str],
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: str,
    json_keys: list[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    log_interval: int = 1000,
    strict: bool = False,
    input_format: str = "auto",
    progress: bool = True,
) -> PreprocessSummary:
    """Tokenize `inputs` into one megatron-core indexed dataset per json key (see module doc)."""
    from nbdiff_megatron.data import megatron_io

    json_keys = list(json_keys)
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}.")
    if len(set(json_keys)) != len(json_keys) or not json_keys:
        raise DataError(f"--json-keys {json_keys} must be distinct and non-empty.")
    tokenizer_type = canonical_tokenizer_type(tokenizer_type)
    tokenizer = load_tokenizer(tokenizer_type, tokenizer_model)
    _check_writable(output_prefix)

    files, missing = expand_inputs(list(inputs))
    if strict and missing:
        raise DataError(
            f"{missing[0]}; fix the --input path (--strict stops at the first problem)."
        )
    if not files:
        raise DataError(
            "no input file found: " + "; ".join(str(m) for m in missing) + ". Check --input."
        )

    summary = PreprocessSummary()
    for problem in missing:
        _record_problem(summary, problem)
    prefixes = {key: output_prefix_for(output_prefix, key) for key in json_keys}
    tmp_tag = f".tmp{os.getpid()}"
    dtype = megatron_io.optimal_dtype(tokenizer.vocab_size)
    builders = {
        key: megatron_io.IndexedDatasetBuilder(prefix + tmp_tag + ".bin", dtype=dtype)
        for key, prefix in prefixes.items()
    }
    finished = False
    t0 = time.perf_counter()
    results = _tokenized_records(
        iter_records(files, json_keys, input_format),
        json_keys,
        tokenizer_type,
        tokenizer_model,
        append_eod,
        tokenizer.eod,
        workers,
    )
    try:
        bar = _ProgressBar(progress, log_interval)
        for result in results:
            if isinstance(result, Problem):
                if strict:
                    raise DataError(f"{result}; fix the input or drop --strict to skip it.")
                _record_problem(summary, result)
                continue
            n_tokens = 0
            for key, ids in result.items():
                builders[key].add_document(ids, [len(ids)])
                n_tokens += len(ids)
            summary.documents += 1
            summary.tokens += n_tokens
            bar.update(1, n_tokens)
        bar.close()
        for key, prefix in prefixes.items():
            builders[key].finalize(prefix + tmp_tag + ".idx")
        summary.seconds = time.perf_counter() - t0
        meta = tokenizer_metadata(tokenizer)
        for key, prefix in prefixes.items():
            sidecar = dict(
                meta,
                format_version=SIDECAR_VERSION,
                json_key=key,
                append_eod=append_eod,
                documents=summary.documents,
                tokens_all_keys=summary.tokens,
                dtype=np.dtype(dtype).name,
                inputs=files,
            )
            with open(prefix + tmp_tag + ".json", "w", encoding="utf-8") as f:
                json.dump(sidecar, f, indent=2)
            for ext in (".bin", ".idx", ".json"):
                os.replace(prefix + tmp_tag + ext, prefix + ext)
            summary.output_prefixes[key] = prefix
        _write_problem_list(output_prefix, summary)
        finished = True
    finally:
        results.close()  # stops the worker pool at once when we leave early
        if not finished:
            for key, prefix in prefixes.items():
                builders[key].data_file.close()
                for ext in (".bin", ".idx", ".json"):
                    if os.path.exists(prefix + tmp_tag + ext):
                        os.remove(prefix + tmp_tag + ext)
    return summary


def _check_writable(output_prefix: str) -> None:
    directory = os.path.dirname(os.path.abspath(output_prefix))
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".nbdiff-write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise DataError(
            f"--output-prefix {output_prefix!r}: cannot write to {directory!r} ({exc}); choose a "
            "writable folder."
        ) from exc


def _record_problem(summary: PreprocessSummary, problem: Problem) -> None:
    summary.skipped[problem.reason] += 1
    summary.problems.append(problem)


def _write_problem_list(output_prefix: str, summary: PreprocessSummary) -> None:
    path = f"{output_prefix}_skipped.txt"
    if summary.problems:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(f"{p}\n" for p in summary.problems)
    elif os.path.exists(path):
        os.remove(path)  # a stale list from an earlier run would mislead


class _ProgressBar:
    """tqdm bar over documents with docs/s and tokens/s, refreshed every `log_interval` docs."""

    def __init__(self, enabled: bool, log_interval: int) -> None:
        self._bar = None
        self._docs = self._tokens = self._pending = 0
        self._interval = max(1, log_interval)
        self._t0 = time.perf_counter()
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(unit="doc", desc="preprocess", file=sys.stderr, mininterval=0.5)

    def update(self, docs: int, tokens: int) -> None:
        self._docs += docs
        self._tokens += tokens
        self._pending += docs
        if self._bar is not None and self._pending >= self._interval:
            self._flush()

    def _flush(self) -> None:
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        self._bar.update(self._pending)
        self._pending = 0
        self._bar.set_postfix_str(
            f"{self._docs / elapsed:,.0f} docs/s, {self._tokens / elapsed:,.0f} tokens/s"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._flush()
            self._bar.close()


# ---- tokenization (in worker processes when --workers > 1) -------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(
    tokenizer_type: str, tokenizer_model: str, json_keys: list[str], append_eod: bool, eod: int
) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER.update(
        tokenizer=load_tokenizer(tokenizer_type, tokenizer_model),
        json_keys=json_keys,
        append_eod=append_eod,
        eod=eod,
    )


def _tokenize_chunk(chunk: list[RawRecord | Problem]) -> list[dict[str, np.ndarray] | Problem]:
    tokenizer: Tokenizer = _WORKER["tokenizer"]
    keys: list[str] = _WORKER["json_keys"]
    parsed: list[dict[str, str] | Problem] = [
        rec if isinstance(rec, Problem) else parse_record(rec, keys) for rec in chunk
    ]
    texts = [p[k] for p in parsed if not isinstance(p, Problem) for k in keys]
    encoded = iter(tokenizer.encode_batch(texts)) if texts else iter(())
    out: list[dict[str, np.ndarray] | Problem] = []
    for p in parsed:
        if isinstance(p, Problem):
            out.append(p)
            continue
        doc = {}
        for key in keys:
            ids = next(encoded)
            if _WORKER["append_eod"]:
                ids = [*ids, _WORKER["eod"]]
            doc[key] = np.asarray(ids, dtype=np.int64)
        out.append(doc)
    return out


def parse_record(record: RawRecord, json_keys: list[str]) -> dict[str, str] | Problem:
    """The text of each key of one record, or the Problem that keeps it out."""
    if record.kind == "json":
        raw: bytes = record.payload
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Problem("invalid UTF-8", record.location, f"byte {exc.start} of the line")
        if not line.strip():
            return Problem("empty line", record.location)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            return Problem("malformed JSON", record.location, exc.msg)
        if not isinstance(obj, dict):
            return Problem("malformed JSON", record.location, "the line is not a JSON object")
    else:
        obj = record.payload
    texts = {}
    for key in json_keys:
        value = obj.get(key)
        if key not in obj or value is None:
            return Problem("missing key", record.location, f"no {key!r}")
        if not isinstance(value, str):
            return Problem("not a string", record.location, f"{key!r} is {type(value).__name__}")
        if not value.strip():
            return Problem("empty document", record.location, f"{key!r} is blank")
        texts[key] = value
    return texts


def _chunks(records: Iterable[RawRecord | Problem], size: int) -> Iterator[list]:
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


def _tokenized_records(
    records: Iterable[RawRecord | Problem],
    json_keys: list[str],
    tokenizer_type: str,
    tokenizer_model: str,
    append_eod: bool,
    eod: int,
    workers: int,
) -> Iterator[dict[str, np.ndarray] | Problem]:
    """Tokenized documents (or Problems) in input order, whatever the number of workers."""
    init_args = (tokenizer_type, tokenizer_model, json_keys, append_eod, eod)
    if workers == 1:
        _init_worker(*init_args)
        for chunk in _chunks(records, CHUNK_RECORDS):
            yield from _tokenize_chunk(chunk)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        for results in pool.imap(_tokenize_chunk, _chunks(records, CHUNK_RECORDS), chunksize=1):
            yield from results
