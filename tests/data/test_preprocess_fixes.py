"""Preprocess fixes: several --json-keys when one key tokenizes to nothing, Megatron-LM's --keep-newlines
without --split-sentences, the missing-input message, the special ids on the console."""

from __future__ import annotations

import json

import pytest

from nbdiff_megatron.cli import main as cli_main
from nbdiff_megatron.data.bundled import bundled_tokenizer_path
from nbdiff_megatron.data.megatron_io import IndexedDataset
from nbdiff_megatron.data.preprocess import preprocess
from nbdiff_megatron.data.tokenizer import load_tokenizer
from nbdiff_megatron.errors import DataError


def _tokenizer_that_drops_hashes(tmp_path) -> str:
    """The bundled tokenizer with a normalizer that deletes '#': "###" has no token at all."""
    spec = json.loads(open(bundled_tokenizer_path(), encoding="utf-8").read())
    spec["normalizer"] = {"type": "Replace", "pattern": {"String": "#"}, "content": ""}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    return str(path)


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_key_without_tokens_drops_its_document_and_shifts_no_other(tmp_path) -> None:
    tok_path = _tokenizer_that_drops_hashes(tmp_path)
    tok = load_tokenizer("HuggingFaceTokenizer", tok_path)
    assert tok.encode("###") == []
    rows = [
        {"text": "###", "title": "First title"},  # 'text' has no token: the document is dropped
        {"text": "Second text.", "title": "Second title"},
        {"text": "Third text.", "title": "Third title"},
    ]
    _write_jsonl(tmp_path / "d.jsonl", rows)
    summary = preprocess(
        [str(tmp_path / "d.jsonl")],
        str(tmp_path / "out"),
        "HuggingFaceTokenizer",
        tok_path,
        json_keys=["text", "title"],
        progress=False,
    )
    assert summary.documents == 2 and [p.reason for p in summary.problems] == ["empty document"]
    for key in ("text", "title"):
        ds = IndexedDataset(summary.output_prefixes[key])
        assert [ds[i].tolist() for i in range(2)] == [tok.encode(r[key]) for r in rows[1:]], key


def test_keep_newlines_without_split_sentences_is_accepted_as_megatron_does(tmp_path) -> None:
    _write_jsonl(tmp_path / "d.jsonl", [{"text": "One line.\nTwo lines."}])
    plain = preprocess(
        [str(tmp_path / "d.jsonl")],
        str(tmp_path / "a"),
        "HuggingFaceTokenizer",
        bundled_tokenizer_path(),
        progress=False,
    )
    kept = preprocess(
        [str(tmp_path / "d.jsonl")],
        str(tmp_path / "b"),
        "HuggingFaceTokenizer",
        bundled_tokenizer_path(),
        keep_newlines=True,
        progress=False,
    )
    a = IndexedDataset(plain.output_prefixes["text"])
    b = IndexedDataset(kept.output_prefixes["text"])
    assert a[0].tolist() == b[0].tolist()  # ignored, as in Megatron-LM


def test_missing_input_message_and_special_ids_on_the_console(tmp_path, capsys) -> None:
    with pytest.raises(DataError) as err:
        preprocess(
            [str(tmp_path / "dat" / "*.jsonl.gz")],
            str(tmp_path / "x"),
            "HuggingFaceTokenizer",
            bundled_tokenizer_path(),
        )
    assert str(err.value) == (
        f"no input file found: {tmp_path}/dat/*.jsonl.gz (no file matches). Check --input."
    )
    _write_jsonl(tmp_path / "d.jsonl", [{"text": "In the beginning"}])
    args = ["preprocess", "--input", str(tmp_path / "d.jsonl"), "--output-prefix"]
    args += [str(tmp_path / "c"), "--tokenizer-type", "HuggingFaceTokenizer"]
    assert cli_main([*args, "--tokenizer-model", bundled_tokenizer_path(), "--quiet"]) == 0
    tok = load_tokenizer("HuggingFaceTokenizer", bundled_tokenizer_path())
    out = capsys.readouterr().out
    assert f"end-of-document {tok.eod}, [MASK] {tok.mask_id}" in out
