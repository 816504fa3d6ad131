"""`nbdiff preprocess`: round trip into megatron-core's IndexedDataset, inputs, bad input, CLI."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nbdiff_megatron.cli import main as cli_main
from nbdiff_megatron.data.bundled import bundled_tokenizer_path
from nbdiff_megatron.data.preprocess import preprocess, read_sidecar
from nbdiff_megatron.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOK = ("HuggingFaceTokenizer", bundled_tokenizer_path())
DOCS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "To be, or not to be: that is the question. <|endoftext|> is text here",
    "Ünïcödé — “quotes” ☃ and\nnew lines\n",
]


def _indexed(prefix):
    from nbdiff_megatron.data.megatron_io import IndexedDataset

    return IndexedDataset(prefix)


def _write_jsonl(path, rows, gz=False):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    with gzip.open(path, "wb") if gz else open(path, "wb") as f:
        f.write(data)


def test_jsonl_round_trip_gives_tokenizer_ids_plus_eod(tmp_path, tokenizer):
    src = tmp_path / "docs.jsonl"
    _write_jsonl(src, [{"text": d, "id": i} for i, d in enumerate(DOCS)])
    summary = preprocess(
        [str(src)], str(tmp_path / "out" / "c"), *TOK, append_eod=True, progress=False
    )
    assert summary.documents == len(DOCS) and not summary.problems
    ds = _indexed(summary.output_prefixes["text"])
    assert len(ds) == len(DOCS)
    for i, doc in enumerate(DOCS):
        assert ds[i].tolist() == tokenizer.encode(doc) + [tokenizer.eod]
    assert summary.tokens == sum(len(tokenizer.encode(d)) + 1 for d in DOCS)
    assert ds[0].dtype == np.uint16  # vocab 4096 < 65500: Megatron's rule
    meta = read_sidecar(summary.output_prefixes["text"])
    assert meta["eod"] == tokenizer.eod and meta["mask_id"] == tokenizer.mask_id
    assert meta["vocab_size"] == 4096 and meta["documents"] == len(DOCS)
    assert not os.path.exists(str(tmp_path / "out" / "c_skipped.txt"))


def test_inputs_gz_parquet_text_globs_and_several_keys(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write_jsonl(tmp_path / "a.jsonl.gz", [{"text": DOCS[0], "title": "A"}], gz=True)
    _write_jsonl(tmp_path / "b.jsonl", [{"text": DOCS[1], "title": "B"}])
    pq.write_table(pa.table({"text": [DOCS[2]], "title": ["C"]}), tmp_path / "c.parquet")
    summary = preprocess(
        [str(tmp_path / "*.jsonl*"), str(tmp_path / "c.parquet")],
        str(tmp_path / "multi"),
        *TOK,
        json_keys=["text", "title"],
        progress=False,
    )
    assert summary.documents == 3
    text = _indexed(summary.output_prefixes["text"])
    title = _indexed(summary.output_prefixes["title"])
    assert [text[i].tolist() for i in range(3)] == [tokenizer.encode(d) for d in DOCS[:3]]
    assert [title[i].tolist() for i in range(3)] == [tokenizer.encode(t) for t in "ABC"]

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "one.txt").write_text(DOCS[3])
    (tmp_path / "t" / "two.txt").write_text(DOCS[0])
    summary = preprocess([str(tmp_path / "t")], str(tmp_path / "txt"), *TOK, progress=False)
    ds = _indexed(summary.output_prefixes["text"])
    assert [ds[0].tolist(), ds[1].tolist()] == [
        tokenizer.encode(DOCS[3]),
        tokenizer.encode(DOCS[0]),
    ]


def test_two_workers_write_the_same_bytes_as_one(tmp_path):
    rows = [{"text": f"{DOCS[i % 4]} number {i}"} for i in range(700)]
    rows[300] = {"nope": 1}
    _write_jsonl(tmp_path / "d.jsonl", rows)
    outs = []
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        s = preprocess([str(tmp_path / "d.jsonl")], prefix, *TOK, workers=workers, progress=False)
        outs.append(
            (
                open(f"{prefix}_text_document.bin", "rb").read(),
                open(f"{prefix}_text_document.idx", "rb").read(),
                s.problems,
            )
        )
    assert outs[0] == outs[1]
    assert [str(p) for p in outs[0][2]] == [f"{tmp_path}/d.jsonl:301: missing key (no 'text')"]


def _bad_input(tmp_path):
    path = tmp_path / "bad.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "good one"}\n')  # 1
        f.write(b'{"text": "broken\n')  # 2 malformed JSON
        f.write(b'{"title": "no text"}\n')  # 3 missing key
        f.write(b'{"text": "   "}\n')  # 4 empty document
        f.write(b'{"text": "bad \xff byte"}\n')  # 5 invalid UTF-8
        f.write(b"\n")  # 6 empty line
        f.write(b'{"text": ["a list"]}\n')  # 7 not a string
        f.write(b"[1, 2]\n")  # 8 not an object
        f.write(b'{"text": "good two"}\n')  # 9
    return path


def test_bad_input_is_skipped_counted_and_reported(tmp_path, tokenizer):
    path = _bad_input(tmp_path)
    missing = tmp_path / "missing.jsonl"
    summary = preprocess([str(path), str(missing)], str(tmp_path / "o"), *TOK, progress=False)
    assert summary.documents == 2
    assert dict(summary.skipped) == {
        "malformed JSON": 2,
        "missing key": 1,
        "empty document": 1,
        "invalid UTF-8": 1,
        "empty line": 1,
        "not a string": 1,
        "missing input file": 1,
    }
    lines = sorted(int(str(p).split(":")[1]) for p in summary.problems if str(path) in str(p))
    assert lines == [2, 3, 4, 5, 6, 7, 8]
    report = (tmp_path / "o_skipped.txt").read_text()
    assert f"{path}:5: invalid UTF-8" in report and f"{missing}: missing input file" in report
    assert "records skipped:   8" in summary.format()
    ds = _indexed(summary.output_prefixes["text"])
    assert [ds[0].tolist(), ds[1].tolist()] == [
        tokenizer.encode("good one"),
        tokenizer.encode("good two"),
    ]


def test_strict_stops_before_writing_anything(tmp_path):
    path = _bad_input(tmp_path)
    out = tmp_path / "strict"
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        preprocess([str(path)], str(out / "x"), *TOK, strict=True, progress=False, workers=2)
    assert os.listdir(out) == []
    with pytest.raises(DataError, match="missing input file"):
        preprocess([str(tmp_path / "none.jsonl"), str(path)], str(out / "x"), *TOK, strict=True)
    assert os.listdir(out) == []


def test_missing_inputs_and_unwritable_prefix(tmp_path):
    with pytest.raises(DataError, match="no input file found"):
        preprocess([str(tmp_path / "none*.jsonl")], str(tmp_path / "x"), *TOK)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="cannot write"):
        preprocess([str(tmp_path / "d.jsonl")], str(blocker / "sub" / "x"), *TOK)


def test_cli_in_process(tmp_path, capsys, tokenizer):
    _write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    code = cli_main(
        [
            "preprocess",
            "--input",
            str(tmp_path / "d.jsonl"),
            "--output-prefix",
            str(tmp_path / "cli"),
            "--tokenizer-type",
            TOK[0],
            "--tokenizer-model",
            TOK[1],
            "--append-eod",
            "--workers",
            "1",
            "--log-interval",
            "1",
            "--quiet",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "documents written: 4" in out
    ds = _indexed(str(tmp_path / "cli_text_document"))
    assert ds[3].tolist() == tokenizer.encode(DOCS[3]) + [tokenizer.eod]
    # a user error is printed without a traceback and gives exit code 2
    code = cli_main(
        [
            "preprocess",
            "--input",
            str(tmp_path / "none.jsonl"),
            "--output-prefix",
            str(tmp_path / "cli2"),
            "--tokenizer-type",
            TOK[0],
            "--tokenizer-model",
            TOK[1],
        ]
    )
    assert code == 2 and "no input file found" in capsys.readouterr().err


def test_tools_preprocess_data_script(tmp_path, tokenizer):
    _write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS[:2]])
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "preprocess_data.py"),
            "--input",
            str(tmp_path / "d.jsonl"),
            "--output-prefix",
            str(tmp_path / "tool"),
            "--tokenizer-type",
            TOK[0],
            "--tokenizer-model",
            TOK[1],
            "--append-eod",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "documents written: 2" in proc.stdout and "tokens/s" in proc.stderr
    ds = _indexed(str(tmp_path / "tool_text_document"))
    assert ds[1].tolist() == tokenizer.encode(DOCS[1]) + [tokenizer.eod]


def test_plain_text_split_modes_and_byte_order_mark(tmp_path, tokenizer):
    text = "\ufeffFirst paragraph,\nstill first.\n\n\nSecond one.\nThird line\n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    expected = {
        "file": [text[1:]],  # the BOM is dropped, everything else kept
        "paragraph": ["First paragraph,\nstill first.", "Second one.\nThird line"],
        "line": ["First paragraph,", "still first.", "Second one.", "Third line"],
    }
    for split, docs in expected.items():
        s = preprocess([str(tmp_path / "t.txt")], str(tmp_path / split), *TOK, text_split=split,
                       progress=False)  # fmt: skip
        ds = _indexed(s.output_prefixes["text"])
        assert [ds[i].tolist() for i in range(len(ds))] == [tokenizer.encode(d) for d in docs]
    # a BOM before the first JSON line no longer costs that line
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "one"}\n{"text": "two"}\n')
    s = preprocess([str(tmp_path / "bom.jsonl")], str(tmp_path / "bom"), *TOK, progress=False)
    assert s.documents == 2 and not s.problems


def test_long_line_is_skipped_and_listed(tmp_path, tokenizer):
    path = tmp_path / "long.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "short"}\n')
        f.write(b'{"text": "' + b"x" * 5000 + b'"}\n')
        f.write(b'{"text": "after"}\n')
    s = preprocess([str(path)], str(tmp_path / "o"), *TOK, max_line_bytes=1000, progress=False)
    assert s.documents == 2 and [p.reason for p in s.problems] == ["line too long"]
    assert str(s.problems[0]).startswith(f"{path}:2: line too long (5013 bytes")
    assert "line too long" in (tmp_path / "o_skipped.txt").read_text()
    ds = _indexed(s.output_prefixes["text"])
    assert [ds[0].tolist(), ds[1].tolist()] == [
        tokenizer.encode("short"),
        tokenizer.encode("after"),
    ]
    # the same limit holds for plain text documents
    (tmp_path / "big.txt").write_text("y" * 3000 + "\n\nsmall\n")
    s = preprocess([str(tmp_path / "big.txt")], str(tmp_path / "t"), *TOK, max_line_bytes=1000,
                   text_split="paragraph", progress=False)  # fmt: skip
    assert s.documents == 1 and [p.reason for p in s.problems] == ["document too long"]


def test_empty_input_or_no_valid_document_is_an_error_and_writes_nothing(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.jsonl").write_bytes(b"")
    (tmp_path / "in" / "bad.jsonl").write_bytes(b'{"title": "no text"}\n\n')
    out = tmp_path / "out"
    for name in ("empty.jsonl", "bad.jsonl"):
        with pytest.raises(DataError, match=f"no valid document in .*{name}.*nothing was written"):
            preprocess([str(tmp_path / "in" / name)], str(out / "x"), *TOK, progress=False)
        assert os.listdir(out) == []


def test_outputs_in_the_input_folder_are_not_read_back(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _write_jsonl(folder / "d.jsonl", [{"text": d} for d in DOCS])
    (folder / "bad.jsonl").write_bytes(b"{broken\n")
    first = preprocess([str(folder)], str(folder / "corpus"), *TOK, progress=False)
    assert sorted(os.listdir(folder)) == [
        "bad.jsonl", "corpus_skipped.txt", "corpus_text_document.bin",
        "corpus_text_document.idx", "corpus_text_document.json", "d.jsonl",
    ]  # fmt: skip
    again = preprocess([str(folder)], str(folder / "corpus"), *TOK, progress=False)
    assert (again.documents, dict(again.skipped)) == (first.documents, dict(first.skipped))
    # another prefix in the same folder: the first run's sidecar is still not an input
    other = preprocess([str(folder)], str(folder / "other"), *TOK, progress=False)
    assert other.documents == first.documents and dict(other.skipped) == {"malformed JSON": 1}
    # an input that merely starts like the prefix is still an input
    _write_jsonl(folder / "corpus.jsonl", [{"text": "one more"}])
    more = preprocess([str(folder)], str(folder / "corpus"), *TOK, progress=False)
    assert more.documents == first.documents + 1
