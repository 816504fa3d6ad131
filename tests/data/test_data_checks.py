"""Data checked before training (issue 23 §6): a .bin against its .idx, token ids against the
vocabulary, SFT lines that cannot be tokenized."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nbdiff_megatron.data.bundled import bundled_tokenizer_dir
from nbdiff_megatron.data.config import DataConfig
from nbdiff_megatron.data.datasets import build_datasets
from nbdiff_megatron.data.sft import UNTOKENIZABLE
from nbdiff_megatron.data.tokenizer import load_tokenizer
from nbdiff_megatron.errors import DataError


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("HuggingFaceTokenizer", bundled_tokenizer_dir())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    from nbdiff_megatron.data.bundled import prepare_bundled_corpus

    return prepare_bundled_corpus(str(tmp_path_factory.mktemp("corpus")), max_documents=40)


def _copy(prefix: str, folder: Path, sidecar: bool = True) -> str:
    folder.mkdir()
    for ext in (".bin", ".idx", ".json"):
        if ext != ".json" or sidecar:
            shutil.copy(prefix + ext, folder / ("data" + ext))
    return str(folder / "data")


def _build(prefix: str, tokenizer) -> None:
    cfg = DataConfig(data_path=[prefix], tokenizer_model=bundled_tokenizer_dir(), split="100,0,0")
    build_datasets(cfg, 32, tokenizer, (16, None, None))


def test_a_truncated_bin_is_named_before_training(corpus: str, tokenizer, tmp_path: Path) -> None:
    prefix = _copy(corpus, tmp_path / "cut")
    bin_path = Path(prefix + ".bin")
    # A small cut: the old code failed only when training reached the last documents.
    bin_path.write_bytes(bin_path.read_bytes()[:-2])
    with pytest.raises(DataError, match=rf"{bin_path}.* is truncated"):
        _build(prefix, tokenizer)


def test_token_ids_beyond_the_vocabulary_are_named(corpus: str, tokenizer, tmp_path: Path) -> None:
    prefix = _copy(corpus, tmp_path / "foreign", sidecar=False)  # Megatron-LM data: no sidecar
    tokens = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r+")
    tokens[5] = tokenizer.vocab_size + 100
    tokens.flush()
    del tokens
    with pytest.raises(DataError, match=rf"token id {tokenizer.vocab_size + 100}, outside"):
        _build(prefix, tokenizer)
    _build(corpus, tokenizer)  # the intact data passes


def test_an_untokenizable_sft_line_is_skipped_and_counted(tokenizer, tmp_path: Path) -> None:
    conv = [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi."},
    ]
    bad = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\ud800"}]
    path = tmp_path / "chat.jsonl"
    # json.dumps writes the lone surrogate as the escape "\ud800": valid JSON, no UTF-8 text.
    path.write_text("\n".join(json.dumps({"messages": m}) for m in (conv, bad, conv)) + "\n")
    cfg = DataConfig(mode="sft", sft_data_path=[str(path)], tokenizer_model=bundled_tokenizer_dir())
    train = build_datasets(cfg, 64, tokenizer, (4, None, None))[0]
    assert train.stats.skipped[UNTOKENIZABLE] == 1
    assert train.stats.used == 2
