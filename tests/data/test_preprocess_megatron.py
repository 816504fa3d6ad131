"""Megatron-LM command lines run unchanged and write the bytes Megatron-LM's preprocessing writes.

The reference below follows Megatron-LM's tools/preprocess_data.py step by step (partition files
dealt line by line, sentences split by punkt in 1,000,000-character chunks, empty sentences
dropped, EOD added to the last sentence, partitions merged with `add_index`) with megatron-core's
own tokenizer classes and `IndexedDatasetBuilder`, and each run is compared with it byte for byte.
"""

import inspect
import json
import math
import os
import subprocess
import sys

import pytest

from nbdiff_megatron.cli import main as cli_main
from nbdiff_megatron.data.bundled import bundled_tokenizer_dir, bundled_tokenizer_path
from nbdiff_megatron.data.preprocess import preprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXTS = [
    "In the beginning God created the heaven and the earth. And the earth was without form.\n"
    "And God said, Let there be light: and there was light.\n\nAnd God saw the light!",
    "Mr. Smith went to Washington. He came back?  Yes, he did.",
    "To be, or not to be: that is the question.",
    "One sentence only",
    "Numbers 1, 22 and 333. Quotes “here” — and ünïcödé.\nLast line.",
]


def _megatron_reference(
    lines,
    prefix,
    tokenize,
    eod,
    vocab_size,
    keys=("text",),
    append_eod=True,
    splitter=None,
    partitions=1,
    keep_sequential=False,
):
    """Megatron-LM's preprocess_data.py output for JSON `lines`, written to `prefix`."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    level = "sentence" if splitter is not None else "document"
    if partitions == 1:
        parts = [lines]
    elif keep_sequential:
        size = math.ceil(len(lines) / partitions)
        parts = [lines[i * size : (i + 1) * size] for i in range(partitions)]
    else:
        parts = [lines[i::partitions] for i in range(partitions)]
    dtype = DType.optimal_dtype(vocab_size)
    part_prefixes = []
    for n, part in enumerate(parts):
        part_prefix = f"{prefix}_{n}" if partitions > 1 else prefix
        part_prefixes.append(part_prefix)
        builders = {
            k: IndexedDatasetBuilder(f"{part_prefix}_{k}_{level}.bin", dtype=dtype) for k in keys
        }
        for line in part:
            data = json.loads(line)
            for key in keys:
                text = data[key]
                if splitter is None:
                    sentences = [text]
                else:
                    sentences = [
                        s
                        for i in range(0, len(text), 1_000_000)
                        for s in splitter.tokenize(text[i : i + 1_000_000])
                    ]
                ids, lens = [], []
                for sentence in sentences:
                    sentence_ids = tokenize(sentence)
                    if sentence_ids:
                        ids.extend(sentence_ids)
                        lens.append(len(sentence_ids))
                if ids and append_eod:
                    ids.append(eod)
                    lens[-1] += 1
                builders[key].add_document(ids, lens)
        for key in keys:
            builders[key].finalize(f"{part_prefix}_{key}_{level}.idx")
    if partitions > 1:
        for key in keys:
            merged = IndexedDatasetBuilder(f"{prefix}_{key}_{level}.bin", dtype=dtype)
            for part_prefix in part_prefixes:
                merged.add_index(f"{part_prefix}_{key}_{level}")
            merged.finalize(f"{prefix}_{key}_{level}.idx")
    return level


def _same_bytes(ours, theirs):
    for ext in (".bin", ".idx"):
        with open(ours + ext, "rb") as a, open(theirs + ext, "rb") as b:
            assert a.read() == b.read(), f"{ours}{ext} differs from Megatron-LM's"


def _jsonl(path, texts, key="text"):
    lines = [json.dumps({key: t}) for t in texts]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return lines


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    """GPT-2 style gpt2-vocab.json + gpt2-merges.txt (the bundled byte-level BPE's)."""
    data = json.load(open(bundled_tokenizer_path(), encoding="utf-8"))
    folder = tmp_path_factory.mktemp("gpt2")
    vocab, merges = folder / "gpt2-vocab.json", folder / "gpt2-merges.txt"
    vocab.write_text(json.dumps(data["model"]["vocab"]), encoding="utf-8")
    pairs = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    merges.write_text("#version: 0.2\n" + "\n".join(pairs) + "\n", encoding="utf-8")
    return str(vocab), str(merges)


@pytest.fixture(scope="module")
def punkt_data(tmp_path_factory):
    """An NLTK_DATA folder with a punkt_tab model trained here (punkt's data is not on PyPI)."""
    from nltk.tokenize import punkt

    from nbdiff_megatron.data.bundled import iter_bundled_documents

    texts = []
    for doc in iter_bundled_documents():
        texts.append(doc["text"])
        if len(texts) == 150:
            break
    trainer = punkt.PunktTrainer()
    trainer.train("\n\n".join(texts), finalize=True)
    root = tmp_path_factory.mktemp("nltk_data")
    model = root / "tokenizers" / "punkt_tab" / "english"
    model.mkdir(parents=True)
    import nltk

    nltk.data.path.append(str(root))  # nltk writes only below its data folders
    try:
        punkt.save_punkt_params(trainer.get_params(), dir=str(model))
    finally:
        nltk.data.path.remove(str(root))
    return str(root), trainer.get_params()


def _transformers_gpt2(vocab, merges):
    """transformers' GPT-2 tokenizer from the two files (its keyword names changed in v5)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return transformers.GPT2Tokenizer(vocab=vocab, merges=merges)
    return transformers.GPT2TokenizerFast(vocab_file=vocab, merges_file=merges)


class _KeepNewlinesReference:
    """Megatron-LM's --keep-newlines splitter, built independently of ours."""

    def __init__(self, params):
        from nltk.tokenize import punkt

        class Vars(punkt.PunktLanguageVars):
            _period_context_fmt = (
                r"\S*%(SentEndChars)s\s*(?=(?P<after_tok>%(NonWord)s|(?P<next_tok>\S+)))"
            )

        self._tok = punkt.PunktSentenceTokenizer(train_text=params, lang_vars=Vars())

    def tokenize(self, text):
        return self._tok.tokenize(text)


def test_megatron_command_line_runs_unchanged_and_matches(tmp_path, gpt2_files, punkt_data):
    pytest.importorskip("nltk")
    vocab, merges = gpt2_files
    nltk_root, params = punkt_data
    src = tmp_path / "corpus.jsonl"
    lines = _jsonl(src, TEXTS * 3)
    out = tmp_path / "out" / "my-gpt2"
    (tmp_path / "out").mkdir()
    command = [
        sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"),
        "--input", str(src),
        "--output-prefix", str(out),
        "--tokenizer-type", "GPT2BPETokenizer",
        "--vocab-file", vocab,
        "--merge-file", merges,
        "--append-eod",
        "--workers", "2",
        "--partitions", "2",
        "--split-sentences",
        "--keep-newlines",
        "--log-interval", "5",
        "--vocab-extra-ids", "0",
    ]  # fmt: skip
    env = dict(os.environ, NLTK_DATA=nltk_root, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "documents written: 15" in proc.stdout
    assert "--vocab-extra-ids has no effect" in proc.stderr

    ref_tok = _transformers_gpt2(vocab, merges)
    eod = ref_tok.convert_tokens_to_ids("<|endoftext|>")
    splitter = _KeepNewlinesReference(params)
    # --keep-newlines keeps every character: the sentences put back together are the document
    assert "".join(splitter.tokenize(TEXTS[0])) == TEXTS[0]
    reference = tmp_path / "ref" / "my-gpt2"
    (tmp_path / "ref").mkdir()
    level = _megatron_reference(
        lines,
        str(reference),
        lambda t: ref_tok.convert_tokens_to_ids(ref_tok.tokenize(t)),
        eod,
        len(ref_tok),
        splitter=splitter,
        partitions=2,
    )
    assert level == "sentence"
    _same_bytes(f"{out}_text_sentence", f"{reference}_text_sentence")


@pytest.mark.parametrize("keep_sequential", [False, True])
def test_partitions_order_and_null_tokenizer(tmp_path, keep_sequential):
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    texts = [" ".join(str((7 * i + j) % 300) for j in range(1 + i % 5)) for i in range(11)]
    lines = _jsonl(tmp_path / "ids.jsonl", texts)
    out = str(tmp_path / "null")
    flags = ["--keep-sequential-samples"] if keep_sequential else []
    code = cli_main(
        ["preprocess", "--input", str(tmp_path / "ids.jsonl"), "--output-prefix", out,
         "--tokenizer-type", "NullTokenizer", "--vocab-size", "300", "--append-eod",
         "--partitions", "3", "--workers", "1", "--quiet", *flags]
    )  # fmt: skip
    assert code == 0
    # Megatron-LM since 2026-04: EOD = vocab_size - 1 within vocab_size ids; before (megatron-core
    # 0.16.1): EOD = the argument, vocab = argument + 1. Both describe 300 ids with EOD 299 here.
    new_api = "eod_id" in inspect.signature(NullTokenizer).parameters
    ref = NullTokenizer(300 if new_api else 299)
    assert (ref.eod, ref.vocab_size) == (299, 300)
    _megatron_reference(
        lines, str(tmp_path / "ref"), ref.text_to_ids, ref.eod, ref.vocab_size,
        partitions=3, keep_sequential=keep_sequential,
    )  # fmt: skip
    _same_bytes(f"{out}_text_document", str(tmp_path / "ref_text_document"))


def test_llama2_sentencepiece_and_hf_special_tokens_match(tmp_path, sample_texts):
    import sentencepiece as spm
    from megatron.core.tokenizers.text.libraries.huggingface_tokenizer import (
        HuggingFaceTokenizer as MegatronHF,
    )
    from megatron.core.tokenizers.text.libraries.sentencepiece_tokenizer import (
        SentencePieceTokenizer as MegatronSP,
    )

    lines = _jsonl(tmp_path / "d.jsonl", TEXTS + ["a <|endoftext|> inside <|user|> text"])
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_texts), model_prefix=str(tmp_path / "sp"),
        vocab_size=300, minloglevel=2,
    )  # fmt: skip
    model = str(tmp_path / "sp.model")
    preprocess([str(tmp_path / "d.jsonl")], str(tmp_path / "sp"), "Llama2Tokenizer", model,
               append_eod=True, progress=False)  # fmt: skip
    ref = MegatronSP(model)
    _megatron_reference(lines, str(tmp_path / "rsp"), ref.text_to_ids, ref.eos_id, ref.vocab_size)
    _same_bytes(str(tmp_path / "sp_text_document"), str(tmp_path / "rsp_text_document"))

    # --tokenizer-hf-include-special-tokens: special strings are tokens and BOS/EOS are added
    folder = bundled_tokenizer_dir()
    code = cli_main(
        ["preprocess", "--input", str(tmp_path / "d.jsonl"), "--output-prefix",
         str(tmp_path / "hf"), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
         folder, "--append-eod", "--tokenizer-hf-include-special-tokens", "--quiet"]
    )  # fmt: skip
    assert code == 0
    ref = MegatronHF(folder, include_special_tokens=True)
    _megatron_reference(lines, str(tmp_path / "rhf"), ref.text_to_ids, ref.eod, ref.vocab_size)
    _same_bytes(str(tmp_path / "hf_text_document"), str(tmp_path / "rhf_text_document"))


def test_refused_and_ignored_megatron_flags(tmp_path, capsys):
    _jsonl(tmp_path / "d.jsonl", TEXTS[:2])
    base = ["preprocess", "--input", str(tmp_path / "d.jsonl"), "--output-prefix",
            str(tmp_path / "o"), "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", bundled_tokenizer_path(), "--quiet"]  # fmt: skip
    code = cli_main([*base, "--find-optimal-num-workers", "--workers-to-check", "2", "4",
                     "--tiktoken-num-special-tokens", "1000"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--find-optimal-num-workers: it times worker counts" in err
    assert "--workers-to-check" in err and "--tiktoken-num-special-tokens" in err
    assert not os.path.exists(tmp_path / "o_text_document.bin")
    code = cli_main([*base, "--tokenizer-type", "BertWordPieceLowerCase"])
    assert code == 2 and "no end-of-document token" in capsys.readouterr().err
    code = cli_main([*base, "--padded-vocab-size", "4096", "--tokenizer-hf-use-fast"])
    captured = capsys.readouterr()
    assert code == 0 and "documents written: 2" in captured.out
    assert "note: --padded-vocab-size has no effect" in captured.err


def test_split_sentences_without_punkt_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    pytest.importorskip("nltk")
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    _jsonl(tmp_path / "d.jsonl", TEXTS[:1])
    code = cli_main(
        ["preprocess", "--input", str(tmp_path / "d.jsonl"), "--output-prefix",
         str(tmp_path / "o"), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
         bundled_tokenizer_path(), "--split-sentences", "--quiet"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "punkt_tab model for --lang 'english' is not installed" in err
    assert "NLTK_DATA" in err and os.listdir(tmp_path) == ["d.jsonl"]
