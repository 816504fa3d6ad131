"""Read text records from JSONL (plain or .gz), parquet and plain-text files, keeping file:line.

Readers never decide what is a good document: they hand raw records to the tokenizing workers,
which report every problem with its location (see preprocess.py). Problems only the reader can see
(a missing or unreadable file, a line longer than `max_line_bytes`) come out as `Problem` records
in the same stream, in order. A UTF-8 byte-order mark at the start of a file is dropped.

Plain text (`.txt`, `.md`, `.text`, optionally gzipped) becomes documents by `text_split`:
`file` (the whole file is one document, the default), `paragraph` (blank lines separate documents)
or `line` (every non-blank line is a document).
"""

from __future__ import annotations

import glob
import gzip
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

INPUT_FORMATS = ("auto", "jsonl", "parquet", "text")
TEXT_SPLITS = ("file", "paragraph", "line")
# A longer JSONL line (or text record) is skipped: tokenizing one 40 MB line took 7 GB of memory.
DEFAULT_MAX_LINE_BYTES = 8 * 1024 * 1024
_BOM = b"\xef\xbb\xbf"
# What preprocessing writes after its --output-prefix (sidecars, also while being written; problem list).
_OUTPUT_NAME = re.compile(r"_.+_(document|sentence)(\.tmp\d+)?\.json|_skipped\.txt")
_READ_CHUNK = 1 << 20
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


def expand_inputs(
    inputs: list[str], output_prefix: str | None = None
) -> tuple[list[str], list[Problem]]:
    """Files named by paths, globs and folders (sorted, de-duplicated), and those that are missing.

    Folders and globs never yield what preprocessing writes: files under `output_prefix` and the
    sidecars of indexed datasets (`x.json` beside `x.idx`), so a second run over the same folder
    reads the same inputs as the first.
    """
    files: list[str] = []
    missing: list[Problem] = []
    for spec in inputs:
        if os.path.isdir(spec):
            found = sorted(
                p
                for p in glob.glob(os.path.join(spec, "**", "*"), recursive=True)
                if os.path.isfile(p)
                and detect_format(p, "auto") is not None
                and not is_preprocess_output(p, output_prefix)
            )
        elif glob.has_magic(spec):
            found = sorted(
                p
                for p in glob.glob(spec, recursive=True)
                if os.path.isfile(p) and not is_preprocess_output(p, output_prefix)
            )
        else:
            found = [spec] if os.path.isfile(spec) else []
        if not found:
            what = (
                "no file matches" if glob.has_magic(spec) or os.path.isdir(spec) else "no such file"
            )
            missing.append(Problem("missing input file", spec, what))  # a file, no line
        for path in found:
            if path not in files:
                files.append(path)
    return files, missing


def is_preprocess_output(path: str, output_prefix: str | None = None) -> bool:
    """True for a file `nbdiff preprocess` writes: under the output prefix, or a dataset sidecar."""
    prefix = os.path.abspath(output_prefix) if output_prefix else None
    full = os.path.abspath(path)
    if prefix and full.startswith(prefix) and _OUTPUT_NAME.fullmatch(full[len(prefix) :]):
        return True
    stem, ext = os.path.splitext(path)
    if ext == ".json" and (os.path.exists(stem + ".idx") or os.path.exists(stem + ".bin")):
        return True
    return path.endswith("_skipped.txt") and bool(glob.glob(glob.escape(path[:-12]) + "_*.idx"))


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
    files: list[str],
    json_keys: list[str],
    input_format: str = "auto",
    text_split: str = "file",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
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
            yield from _iter_jsonl(path, max_line_bytes)
        elif fmt == "parquet":
            yield from _iter_parquet(path, json_keys)
        else:
            yield from _iter_text(path, json_keys[0], text_split, max_line_bytes)


def _lines(f, max_line_bytes: int) -> Iterator[bytes | int]:
    """The lines of a binary file (BOM dropped); a line over the limit comes out as its length.

    A long line is never held whole: it is read in chunks and only counted.
    """
    first = True
    while True:
        line = f.readline(max_line_bytes + 1)
        if first:
            first = False
            if line.startswith(_BOM):
                line = line[len(_BOM) :]
        if not line:
            return
        if len(line) > max_line_bytes and not (
            len(line) == max_line_bytes + 1 and line.endswith(b"\n")
        ):
            n = len(line)
            while not line.endswith(b"\n"):
                line = f.readline(_READ_CHUNK)
                if not line:
                    break
                n += len(line)
            yield n
            continue
        yield line


def _too_long(location: str, n: int, max_line_bytes: int, what: str = "line") -> Problem:
    return Problem(
        f"{what} too long",
        location,
        f"{n} bytes > --max-line-bytes {max_line_bytes}; raise the limit to keep it",
    )


def _iter_jsonl(path: str, max_line_bytes: int) -> Iterator[RawRecord | Problem]:
    line_no = 0
    try:
        with _open_binary(path) as f:
            for line in _lines(f, max_line_bytes):
                line_no += 1
                if isinstance(line, int):
                    yield _too_long(f"{path}:{line_no}", line, max_line_bytes)
                else:
                    yield RawRecord(f"{path}:{line_no}", "json", line)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        yield Problem("unreadable file", f"{path}:{line_no + 1}", str(exc))


def _iter_parquet(path: str, json_keys: list[str]) -> Iterator[RawRecord | Problem]:
    # lazy: pyarrow takes ~0.3 s to import, and only parquet inputs need it
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


def _iter_text(
    path: str, key: str, text_split: str, max_line_bytes: int
) -> Iterator[RawRecord | Problem]:
    """Documents of a plain-text file by `text_split` (the first --json-keys key names them)."""
    if text_split not in TEXT_SPLITS:
        raise ValueError(f"text_split {text_split!r} is not one of {TEXT_SPLITS}")
    what = "line" if text_split == "line" else "document"
    line_no = 0
    try:
        with _open_binary(path) as f:
            for start, parts, size in _text_documents(
                _lines(f, max_line_bytes), text_split, max_line_bytes
            ):
                line_no = start
                if parts is None:
                    yield _too_long(f"{path}:{start}", size, max_line_bytes, what)
                    continue
                data = b"".join(parts)
                if text_split != "file":
                    data = data.rstrip(b"\r\n")
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    line = start + data[: exc.start].count(b"\n")
                    yield Problem("invalid UTF-8", f"{path}:{line}", f"byte {exc.start} of it")
                    continue
                yield RawRecord(f"{path}:{start}", "fields", {key: text})
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        yield Problem("unreadable file", f"{path}:{line_no + 1}", str(exc))


def _text_documents(
    lines: Iterator[bytes | int], text_split: str, max_bytes: int
) -> Iterator[tuple[int, list[bytes] | None, int]]:
    """(first line number, its lines or None when over `max_bytes`, bytes) of each document.

    `file` gives one document even for an empty file (reported downstream as empty); blank lines
    end a `paragraph` and are not documents of `line`.
    """
    start, parts, size = 1, [], 0
    for line_no, line in enumerate(lines, start=1):
        blank = not isinstance(line, int) and not line.strip()
        if text_split != "file" and blank:
            if size:
                yield start, parts, size
            start, parts, size = line_no + 1, [], 0
            continue
        if not size:
            start = line_no
        if isinstance(line, int):
            size, parts = size + line, None
        else:
            size += len(line)
            if parts is not None:
                parts.append(line)
        if size > max_bytes:
            parts = None  # counted from here on, never held
        if text_split == "line":
            yield start, parts, size
            start, parts, size = line_no + 1, [], 0
    if size or text_split == "file":
        yield start, parts, size
