"""Read text records from JSONL (plain or .gz), parquet and plain-text files, keeping file:line.

Readers never decide what is a good document: they hand raw records to the tokenizing workers,
which report every problem with its location (see preprocess.py). Problems only the reader can see
(a missing or unreadable file) come out as `Problem` records in the same stream, in order.
"""

from __future__ import annotations

import glob
import gzip
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

INPUT_FORMATS = ("auto", "jsonl", "parquet", "text")
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
_TEXT_SUFFIXES = (".txt", ".txt.gz", ".md", ".text")
_PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class Problem:
    """A record (or a whole file) that was not turned into a document, and why."""

    reason: str
    location: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class RawRecord:
    """One input record before parsing: JSONL bytes, or a parquet row / text file as a dict."""

    location: str
    kind: str  # "json" (payload: bytes) or "fields" (payload: dict[str, Any])
    payload: Any


def expand_inputs(inputs: list[str]) -> tuple[list[str], list[Problem]]:
    """Files named by paths, globs and folders (sorted, de-duplicated), and those that are missing."""
    files: list[str] = []
    missing: list[Problem] = []
    for spec in inputs:
        if os.path.isdir(spec):
            found = sorted(
                p
                for p in glob.glob(os.path.join(spec, "**", "*"), recursive=True)
                if os.path.isfile(p) and detect_format(p, "auto") is not None
            )
        elif glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        else:
            found = [spec] if os.path.isfile(spec) else []
        if not found:
            what = (
                "no file matches" if glob.has_magic(spec) or os.path.isdir(spec) else "no such file"
            )
            missing.append(Problem("missing input file", f"{spec}:0", what))
        for path in found:
            if path not in files:
                files.append(path)
    return files, missing


def detect_format(path: str, input_format: str) -> str | None:
    if input_format != "auto":
        return input_format
    name = path.lower()
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(_TEXT_SUFFIXES):
        return "text"
    return None


def _open_binary(path: str):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def iter_records(
    files: list[str], json_keys: list[str], input_format: str = "auto"
) -> Iterator[RawRecord | Problem]:
    """Every record of every file in order; unreadable files and lines come out as Problems."""
    for path in files:
        fmt = detect_format(path, input_format)
        if fmt is None:
            yield Problem(
                "unknown input format",
                f"{path}:0",
                "name it .jsonl/.jsonl.gz/.parquet/.txt or pass --input-format",
            )
        elif fmt == "jsonl":
            yield from _iter_jsonl(path)
        elif fmt == "parquet":
            yield from _iter_parquet(path, json_keys)
        else:
            yield from _iter_text(path, json_keys[0])


def _iter_jsonl(path: str) -> Iterator[RawRecord | Problem]:
    line_no = 0
    try:
        with _open_binary(path) as f:
            for line_no, line in enumerate(f, start=1):  # noqa: B007 - line_no used after the loop
                yield RawRecord(f"{path}:{line_no}", "json", line)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        yield Problem("unreadable file", f"{path}:{line_no + 1}", str(exc))


def _iter_parquet(path: str, json_keys: list[str]) -> Iterator[RawRecord | Problem]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        yield Problem("unreadable file", f"{path}:0", str(exc))
        return
    columns = [k for k in json_keys if k in parquet.schema_arrow.names]
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=1024, columns=columns or None):
            data = batch.to_pydict()
            for i in range(batch.num_rows):
                row += 1
                yield RawRecord(f"{path}:{row}", "fields", {k: data[k][i] for k in columns})
    except Exception as exc:  # noqa: BLE001
        yield Problem("unreadable file", f"{path}:{row + 1}", str(exc))


def _iter_text(path: str, key: str) -> Iterator[RawRecord | Problem]:
    """A plain-text file is one document (the first --json-keys key names its dataset)."""
    try:
        with _open_binary(path) as f:
            data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        yield Problem("unreadable file", f"{path}:0", str(exc))
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        yield Problem("invalid UTF-8", f"{path}:{line}", f"byte offset {exc.start}")
        return
    yield RawRecord(f"{path}:1", "fields", {key: text})
