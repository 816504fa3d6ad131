"""`nbdiff preprocess`: tokenize text into Megatron indexed datasets (Megatron-LM's flags).

Writes `{output_prefix}_{key}_document.bin/.idx` (`_sentence` with --split-sentences) for each
`--json-keys` key through megatron-core's `IndexedDatasetBuilder` (so its `IndexedDataset` and
`GPTDataset` read them), plus a sidecar `{output_prefix}_{key}_document.json` with the tokenizer
metadata (type, model, vocab size, EOD, mask id) and the counts.

Megatron-LM's `tools/preprocess_data.py` command lines run unchanged: the flags that change its
output (--split-sentences, --keep-newlines, --lang, --partitions, --keep-sequential-samples,
--vocab-file/--merge-file, --vocab-size, --tokenizer-hf-include-special-tokens, ...) mean the same
here and give the same bytes; flags with no effect on the output are accepted with a note, and
those we cannot honour stop the run with the reason (MEGATRON_REFUSED_FLAGS). Deliberate
differences: bad records are skipped and listed instead of ending the run or writing empty
documents, and special-token strings inside documents are text unless
--tokenizer-hf-include-special-tokens is given.

Bad records (malformed JSON, missing keys, empty documents, invalid UTF-8, lines longer than
--max-line-bytes, missing or unreadable files) are skipped and reported with file:line, counted per
reason in the summary and listed in full in `{output_prefix}_skipped.txt`; `--strict` stops at the
first one with a DataError and leaves no output behind. An input without one valid document is an
error and writes nothing. Outputs are written to temporary names and renamed only when complete.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
from tqdm import tqdm

from nbdiff_megatron.data.readers import (
    DEFAULT_MAX_LINE_BYTES,
    INPUT_FORMATS,
    TEXT_SPLITS,
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
from nbdiff_megatron.errors import ConfigError, DataError

CHUNK_RECORDS = 256
SIDECAR_VERSION = 1
# Megatron-LM splits a document into sentences 1,000,000 characters at a time.
SENTENCE_SPLIT_CHUNK = 1_000_000

# Megatron-LM's tools/preprocess_data.py flags we do not honour, and why.
MEGATRON_REFUSED_FLAGS = {
    "--find-optimal-num-workers": "it times worker counts instead of writing the dataset; time "
    "runs with --workers N instead",
    "--workers-to-check": "it belongs to --find-optimal-num-workers, which is not supported",
    "--max-documents": "it belongs to --find-optimal-num-workers, which is not supported",
    "--tokenizer-special-tokens": "it adds tokens to the vocabulary; put them in tokenizer.json "
    "(HuggingFaceTokenizer) or in {file}.special_tokens.json (TikTokenizer)",
    "--tiktoken-special-tokens": "our TikTokenizer takes special tokens from the vocabulary "
    "({file}.special_tokens.json or the known vocabularies)",
    "--tiktoken-pattern": "it names the pattern of Megatron-LM's JSON tiktoken format; our "
    "TikTokenizer reads .tiktoken files and uses the pattern of the vocabulary",
    "--tiktoken-num-special-tokens": "Megatron-LM's TikTokenizer shifts every id by this many "
    "reserved specials; ours keeps the file's ids and its own special tokens",
    "--tokenizer-metadata": "pass --tokenizer-type and --tokenizer-model instead",
    "--tokenizer-sentencepiece-legacy": "special tokens inside sentencepiece text are not "
    "supported; use a HuggingFaceTokenizer tokenizer.json",
    "--tokenizer-hf-no-use-fast": "only fast (Rust) HF tokenizers are used",
    "--trust-remote-code": "no remote code is run; save the tokenizer as tokenizer.json",
}
# Megatron-LM flags that do not change what preprocessing writes: accepted, with a note.
MEGATRON_NO_EFFECT_FLAGS = {
    "--vocab-extra-ids": (1, "Megatron-LM's preprocess_data.py sets it to 0 too"),
    "--padded-vocab-size": (1, "the model's padding is set at training time"),
    "--null-tokenizer-pad-id": (1, "pad ids are not written to datasets"),
    "--chat-template": (1, "templates apply to SFT at training time"),
    "--tokenizer-hf-use-fast": (0, "fast HF tokenizers are always used"),
    "--use-gigatoken": (0, "our tokenizing is already parallel over --workers"),
    "--tokenizer-sentencepiece-ignore-extra-whitespaces": (
        0,
        "sentencepiece's own whitespace handling is used, as in Megatron-LM by default",
    ),
}


@dataclass
class PreprocessSummary:
    """What a preprocessing run produced and what it skipped."""

    documents: int = 0
    tokens: int = 0
    skipped: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)
    output_prefixes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    special_ids: str = ""
    """The end-of-document and [MASK] ids written to the sidecar, as the console shows them."""

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
        if self.special_ids:
            lines.append(f"token ids:         {self.special_ids}")
        return "\n".join(lines)


class _MegatronFlag(argparse.Action):
    """Collects a Megatron-LM flag we refuse or ignore; `run` reports them all at once."""

    def __call__(self, parser, namespace, values, option_string=None):
        getattr(namespace, self.dest).append(option_string)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Megatron-LM's tools/preprocess_data.py flags, plus our own (--strict, --text-split, ...)."""
    group = parser.add_argument_group("input")
    group.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="JSONL (.jsonl/.jsonl.gz), parquet or plain-text files, globs or folders (our own "
        "outputs in a folder are never read)",
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
    group.add_argument(
        "--text-split",
        choices=TEXT_SPLITS,
        default="file",
        help="plain text (.txt/.md/.text): the whole file is one document (file), blank lines "
        "separate documents (paragraph) or every non-blank line is one (line); default file",
    )
    group.add_argument(
        "--max-line-bytes",
        type=int,
        default=DEFAULT_MAX_LINE_BYTES,
        help="a longer JSONL line or text document is skipped and listed (default 8 MiB)",
    )
    group.add_argument(
        "--split-sentences",
        action="store_true",
        help="split documents into sentences (nltk punkt); writes *_sentence.bin/.idx",
    )
    group.add_argument(
        "--keep-newlines",
        action="store_true",
        help="with --split-sentences, keep the newlines between sentences",
    )
    group.add_argument(
        "--lang", default="english", help="punkt model for --split-sentences (default english)"
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-type",
        required=True,
        help=f"one of {', '.join(TOKENIZER_TYPES)} (or Megatron-LM's Llama2Tokenizer, "
        "GPTSentencePieceTokenizer)",
    )
    group.add_argument(
        "--tokenizer-model",
        default=None,
        help="tokenizer.json, HF tokenizer folder, sentencepiece .model or tiktoken file",
    )
    group.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: GPT-2 vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: GPT-2 merges.txt")
    group.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer: number of ids")
    group.add_argument(
        "--null-tokenizer-eod-id",
        type=int,
        default=None,
        help="NullTokenizer: EOD id (default vocab size - 1)",
    )
    group.add_argument(
        "--tokenizer-hf-include-special-tokens",
        dest="include_special_tokens",
        action="store_true",
        default=False,
        help="HF tokenizers: add the tokenizer's own tokens (BOS...) and read special-token "
        "strings in the text as such (Megatron-LM's default since 2026-02)",
    )
    group.add_argument(
        "--tokenizer-hf-no-include-special-tokens",
        dest="include_special_tokens",
        action="store_false",
        help="HF tokenizers: plain text only (our default)",
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
        "--partitions",
        type=int,
        default=1,
        help="Megatron-LM's input partitions: with N > 1 the documents come out in its order "
        "(every N-th record first) unless --keep-sequential-samples",
    )
    group.add_argument(
        "--keep-sequential-samples",
        action="store_true",
        help="with --partitions, keep the input order",
    )
    group.add_argument(
        "--log-interval", type=int, default=1000, help="refresh the progress line every N documents"
    )
    group.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first bad record (DataError) instead of skipping it",
    )
    group.add_argument("--quiet", action="store_true", help="no progress bar")
    group = parser.add_argument_group(
        "Megatron-LM flags without effect here (accepted with a note) or refused (with the reason)"
    )
    parser.set_defaults(megatron_ignored=[], megatron_refused=[])
    for flag, (nargs, why) in MEGATRON_NO_EFFECT_FLAGS.items():
        group.add_argument(
            flag,
            dest="megatron_ignored",
            action=_MegatronFlag,
            nargs=nargs,
            metavar="VALUE",
            help=f"ignored: {why}",
        )
    for flag, why in MEGATRON_REFUSED_FLAGS.items():
        group.add_argument(
            flag,
            dest="megatron_refused",
            action=_MegatronFlag,
            nargs="*",
            metavar="VALUE",
            help=f"refused: {why}",
        )


def run(args: argparse.Namespace) -> int:
    if args.megatron_refused:
        raise ConfigError(
            "these Megatron-LM flags are not supported: "
            + "; ".join(f"{f}: {MEGATRON_REFUSED_FLAGS[f]}" for f in args.megatron_refused)
            + ". Remove them."
        )
    for flag in dict.fromkeys(args.megatron_ignored):
        print(
            f"note: {flag} has no effect here ({MEGATRON_NO_EFFECT_FLAGS[flag][1]})",
            file=sys.stderr,
        )
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
        text_split=args.text_split,
        max_line_bytes=args.max_line_bytes,
        split_sentences=args.split_sentences,
        keep_newlines=args.keep_newlines,
        lang=args.lang,
        partitions=args.partitions,
        keep_sequential_samples=args.keep_sequential_samples,
        tokenizer_options=tokenizer_options(
            args.tokenizer_type,
            vocab_file=args.vocab_file,
            merge_file=args.merge_file,
            vocab_size=args.vocab_size,
            null_eod_id=args.null_tokenizer_eod_id,
            include_special_tokens=args.include_special_tokens,
        ),
    )
    print(summary.format())
    return 0


def tokenizer_options(
    tokenizer_type: str,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    vocab_size: int | None = None,
    null_eod_id: int | None = None,
    include_special_tokens: bool = False,
) -> dict[str, Any]:
    """The keyword arguments of `load_tokenizer` that Megatron-LM's tokenizer flags stand for."""
    kind = canonical_tokenizer_type(tokenizer_type)
    if kind == "NullTokenizer":
        return {"vocab_size": vocab_size, "eod_id": null_eod_id}
    options: dict[str, Any] = {}
    if kind == "GPT2BPETokenizer":
        options.update(vocab_file=vocab_file, merge_file=merge_file)
    if kind in ("HuggingFaceTokenizer", "GPT2BPETokenizer"):
        options["include_special_tokens"] = include_special_tokens
    return options


def output_prefix_for(output_prefix: str, key: str, level: str = "document") -> str:
    """The indexed-dataset prefix (without .bin/.idx) written for one json key."""
    return f"{output_prefix}_{key}_{level}"


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
    tokenizer_model: str | None,
    json_keys: list[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    log_interval: int = 1000,
    strict: bool = False,
    input_format: str = "auto",
    progress: bool = True,
    text_split: str = "file",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    split_sentences: bool = False,
    keep_newlines: bool = False,
    lang: str = "english",
    partitions: int = 1,
    keep_sequential_samples: bool = False,
    tokenizer_options: dict[str, Any] | None = None,
) -> PreprocessSummary:
    """Tokenize `inputs` into one megatron-core indexed dataset per json key (see module doc)."""
    json_keys = list(json_keys)
    _check_options(workers, partitions, max_line_bytes, text_split, json_keys)
    tokenizer_type = canonical_tokenizer_type(tokenizer_type)
    tokenizer_args = dict(
        tokenizer_type=tokenizer_type,
        tokenizer_model=tokenizer_model,
        **(tokenizer_options or {}),
    )
    tokenizer = load_tokenizer(**tokenizer_args)
    splitter_args = (split_sentences, keep_newlines, lang)
    if split_sentences:
        sentence_splitter(*splitter_args)  # a missing nltk or punkt model fails here, once
    _check_writable(output_prefix)
    files, missing = _input_files(inputs, output_prefix, strict)

    summary = PreprocessSummary()
    for problem in missing:
        _record_problem(summary, problem)
    level = "sentence" if split_sentences else "document"
    prefixes = {key: output_prefix_for(output_prefix, key, level) for key in json_keys}
    staged = _StagedDatasets(prefixes, tokenizer.text_vocab_size)
    finished = False
    t0 = time.perf_counter()

    def records() -> Iterator[RawRecord | Problem]:
        return iter_records(files, json_keys, input_format, text_split, max_line_bytes)

    results = _tokenized_records(
        _megatron_partition_order(records, partitions, keep_sequential_samples),
        json_keys,
        tokenizer_args,
        append_eod,
        tokenizer.eod,
        splitter_args,
        workers,
    )
    try:
        _write_documents(results, staged, summary, strict, _ProgressBar(progress, log_interval))
        if summary.documents == 0:
            raise DataError(_no_document_message(files, summary))
        summary.seconds = time.perf_counter() - t0
        meta = tokenizer_metadata(tokenizer)
        summary.special_ids = _special_ids_line(meta)

        def sidecar(key: str) -> dict[str, Any]:
            return dict(
                meta,
                format_version=SIDECAR_VERSION,
                json_key=key,
                append_eod=append_eod,
                documents=summary.documents,
                tokens_all_keys=summary.tokens,
                dtype=np.dtype(staged.dtype).name,
                inputs=files,
                split_sentences=split_sentences,
                include_special_tokens=bool(getattr(tokenizer, "include_special_tokens", False)),
            )

        summary.output_prefixes = staged.commit(sidecar)
        _write_problem_list(output_prefix, summary)
        finished = True
    finally:
        results.close()  # stops the worker pool at once when we leave early
        if not finished:
            staged.discard()
    return summary


def _check_options(
    workers: int, partitions: int, max_line_bytes: int, text_split: str, json_keys: list[str]
) -> None:
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}.")
    if partitions < 1:
        raise DataError(f"--partitions must be >= 1, got {partitions}.")
    if max_line_bytes < 1:
        raise DataError(f"--max-line-bytes must be >= 1, got {max_line_bytes}.")
    if text_split not in TEXT_SPLITS:
        raise DataError(f"--text-split {text_split!r} must be one of {', '.join(TEXT_SPLITS)}.")
    # --keep-newlines without --split-sentences does nothing, as in Megatron-LM (which accepts it)
    if len(set(json_keys)) != len(json_keys) or not json_keys:
        raise DataError(f"--json-keys {json_keys} must be distinct and non-empty.")


def _input_files(
    inputs: list[str], output_prefix: str, strict: bool
) -> tuple[list[str], list[Problem]]:
    """The input files to read and the inputs that could not be found (an error under --strict)."""
    files, missing = expand_inputs(list(inputs), output_prefix)
    if strict and missing:
        raise DataError(
            f"{missing[0]}; fix the --input path (--strict stops at the first problem)."
        )
    if not files:
        raise DataError(
            "no input file found: "
            + "; ".join(f"{m.location} ({m.detail})" for m in missing)
            + ". Check --input."
        )
    return files, missing


def _write_documents(
    results: Iterable[dict[str, tuple[list[int], list[int]]] | Problem],
    staged: _StagedDatasets,
    summary: PreprocessSummary,
    strict: bool,
    bar: _ProgressBar,
) -> None:
    """Add every tokenized document to the datasets; count, or (--strict) stop at, the bad ones."""
    for result in results:
        if isinstance(result, Problem):
            if strict:
                raise DataError(f"{result}; fix the input or drop --strict to skip it.")
            _record_problem(summary, result)
            continue
        n_tokens = staged.add_document(result)
        summary.documents += 1
        summary.tokens += n_tokens
        bar.update(1, n_tokens)
    bar.close()


def _special_ids_line(meta: dict[str, Any]) -> str:
    """The end-of-document and [MASK] ids, as the summary prints them."""
    return (
        f"end-of-document {meta['eod']}, [MASK] {meta['mask_id']}"
        + (" (added after the vocabulary)" if meta["mask_added"] else "")
        + f", vocabulary {meta['vocab_size']} ([MASK] included)"
    )


class _StagedDatasets:
    """One indexed dataset per json key, written under temporary names: `commit` finalizes them,
    writes their sidecars and renames every file into place; `discard` removes what was written."""

    def __init__(self, prefixes: dict[str, str], text_vocab_size: int) -> None:
        # lazy: megatron_io imports megatron-core; `nbdiff preprocess --help` imports this module
        from nbdiff_megatron.data import megatron_io

        self.prefixes = prefixes
        self.tag = f".tmp{os.getpid()}"
        # Sized as Megatron-LM sizes it: by the ids text can have, not by an appended [MASK].
        self.dtype = megatron_io.optimal_dtype(text_vocab_size)
        self.builders = {
            key: megatron_io.IndexedDatasetBuilder(self._staged(key, ".bin"), dtype=self.dtype)
            for key in prefixes
        }

    def _staged(self, key: str, ext: str) -> str:
        return self.prefixes[key] + self.tag + ext

    def add_document(self, document: dict[str, tuple[list[int], list[int]]]) -> int:
        """Add one document's ids (and sentence lengths) under each key; returns its token count."""
        n_tokens = 0
        for key, (ids, lengths) in document.items():
            self.builders[key].add_document(ids, lengths)
            n_tokens += len(ids)
        return n_tokens

    def commit(self, sidecar_of: Callable[[str], dict[str, Any]]) -> dict[str, str]:
        """Finalize every key's dataset, write its sidecar, rename its files into place; returns the
        output prefix of each key."""
        for key in self.prefixes:
            self.builders[key].finalize(self._staged(key, ".idx"))
        for key, prefix in self.prefixes.items():
            with open(self._staged(key, ".json"), "w", encoding="utf-8") as f:
                json.dump(sidecar_of(key), f, indent=2)
            for ext in (".bin", ".idx", ".json"):
                os.replace(self._staged(key, ext), prefix + ext)
        return dict(self.prefixes)

    def discard(self) -> None:
        for key in self.prefixes:
            self.builders[key].data_file.close()
            for ext in (".bin", ".idx", ".json"):
                if os.path.exists(self._staged(key, ext)):
                    os.remove(self._staged(key, ext))


def _no_document_message(files: list[str], summary: PreprocessSummary) -> str:
    named = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    why = "; ".join(str(p) for p in summary.problems[:5]) or "the input is empty"
    return (
        f"no valid document in {named} ({why}); nothing was written. Check --input, --json-keys "
        "and --input-format."
    )


def _megatron_partition_order(
    records: Any, partitions: int, keep_sequential: bool
) -> Iterator[RawRecord | Problem]:
    """Records in the order Megatron-LM's --partitions writes them.

    It deals input lines to N partition files in turn (record i to partition i mod N) and
    concatenates the partitions' datasets, so its output holds records 0, N, 2N, ..., then 1,
    N+1, ...; --keep-sequential-samples cuts contiguous runs instead, which keeps the input order.
    Here: one pass over the input per partition, so nothing is held in memory.
    """
    if partitions == 1 or keep_sequential:
        yield from records()
        return
    for part in range(partitions):
        for i, record in enumerate(records()):
            if i % partitions == part:
                yield record


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


def sentence_splitter(split_sentences: bool, keep_newlines: bool, lang: str) -> Any:
    """nltk's punkt sentence tokenizer for `lang` (None without --split-sentences).

    Megatron-LM loads punkt's pickled model; nltk >= 3.9 ships the same parameters as `punkt_tab`
    and loads only that. With --keep-newlines the boundary match swallows the whitespace after a
    sentence end, so newlines stay with the sentence before them instead of being dropped.
    """
    if not split_sentences:
        return None
    try:
        # optional (the `preprocess` extra): only --split-sentences needs nltk
        from nltk.tokenize import punkt
    except ImportError as exc:
        raise ConfigError(
            "--split-sentences needs nltk: pip install nltk, and its punkt_tab model."
        ) from exc
    try:
        splitter = punkt.PunktTokenizer(lang)
    except (LookupError, ValueError, OSError) as exc:
        raise ConfigError(
            f"--split-sentences: nltk's punkt_tab model for --lang {lang!r} is not installed. "
            "It is not on PyPI: run nltk.download('punkt_tab') where there is network and copy "
            "the nltk_data folder here, then set NLTK_DATA to it (tokenizers/punkt_tab/"
            f"{lang}/ inside)."
        ) from exc
    if not keep_newlines:
        return splitter

    class KeepNewlines(punkt.PunktLanguageVars):
        _period_context_fmt = r"""
            \S*                          # the word material before the end
            %(SentEndChars)s             # a possible sentence end
            \s*                          # whitespace, newlines included, stays in the match
            (?=(?P<after_tok>
                %(NonWord)s              # then other punctuation
                |
                (?P<next_tok>\S+)        # or the next token, right after that whitespace
            ))"""

    return punkt.PunktSentenceTokenizer(train_text=splitter._params, lang_vars=KeepNewlines())


def _init_worker(
    tokenizer_args: dict[str, Any],
    json_keys: list[str],
    append_eod: bool,
    eod: int,
    splitter_args: tuple[bool, bool, str],
) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER.update(
        tokenizer=load_tokenizer(**tokenizer_args),
        json_keys=json_keys,
        append_eod=append_eod,
        eod=eod,
        splitter=sentence_splitter(*splitter_args),
    )


def _sentences(text: str) -> list[str]:
    splitter = _WORKER["splitter"]
    if splitter is None:
        return [text]
    return [
        sentence
        for start in range(0, len(text), SENTENCE_SPLIT_CHUNK)
        for sentence in splitter.tokenize(text[start : start + SENTENCE_SPLIT_CHUNK])
    ]


Tokenized = dict[str, tuple[np.ndarray, list[int]]]


def _tokenize_chunk(chunk: list[RawRecord | Problem]) -> list[Tokenized | Problem]:
    """Each record's (ids, sentence lengths) per key; one length per document unless split."""
    tokenizer: Tokenizer = _WORKER["tokenizer"]
    keys: list[str] = _WORKER["json_keys"]
    parsed: list[dict[str, str] | Problem] = [
        rec if isinstance(rec, Problem) else parse_record(rec, keys) for rec in chunk
    ]
    pieces = {
        id(p): {k: _sentences(p[k]) for k in keys} for p in parsed if not isinstance(p, Problem)
    }
    texts = [t for per_key in pieces.values() for k in keys for t in per_key[k]]
    try:
        encoded = iter(tokenizer.encode_batch(texts) if texts else ())
    except ValueError:
        encoded = None  # some text cannot be tokenized (NullTokenizer): find it one by one
    out: list[Tokenized | Problem] = []
    for rec, p in zip(chunk, parsed):
        if isinstance(p, Problem):
            out.append(p)
            continue
        doc: Tokenized = {}
        # Take every key's ids of this document from the batch before any key can reject it: the
        # next document's ids start right after them.
        batch_ids = (
            None
            if encoded is None
            else {k: [next(encoded) for _ in pieces[id(p)][k]] for k in keys}
        )
        for key in keys:
            sentences = pieces[id(p)][key]
            if batch_ids is None:
                try:
                    ids_list = [tokenizer.encode(t) for t in sentences]
                except ValueError as exc:
                    doc = Problem("cannot tokenize", rec.location, str(exc))
                    break
            else:
                ids_list = batch_ids[key]
            ids = [i for sentence in ids_list for i in sentence]
            lengths = [len(sentence) for sentence in ids_list if sentence]
            if not ids:
                doc = Problem("empty document", rec.location, f"{key!r} has no token")
                break
            if _WORKER["append_eod"]:
                ids.append(_WORKER["eod"])
                lengths[-1] += 1
            doc[key] = (np.asarray(ids, dtype=np.int64), lengths)
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
    tokenizer_args: dict[str, Any],
    append_eod: bool,
    eod: int,
    splitter_args: tuple[bool, bool, str],
    workers: int,
) -> Iterator[Tokenized | Problem]:
    """Tokenized documents (or Problems) in input order, whatever the number of workers."""
    init_args = (tokenizer_args, json_keys, append_eod, eod, splitter_args)
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
