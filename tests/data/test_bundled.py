"""The bundled corpus, tokenizer and chat set: present, small, consistent with each other."""

import gzip
import json
import os

from nbdiff_megatron.data.bundled import (
    ASSETS,
    bundled_chat_path,
    bundled_corpus_path,
    bundled_tokenizer_dir,
    bundled_tokenizer_path,
    iter_bundled_documents,
)


def test_assets_exist_and_stay_small():
    for path in (
        bundled_corpus_path(),
        bundled_tokenizer_path(),
        bundled_chat_path(),
        os.path.join(bundled_tokenizer_dir(), "tokenizer_config.json"),
        os.path.join(ASSETS, "README.md"),
    ):
        assert os.path.isfile(path), path
    total = sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(ASSETS) for f in files
    )
    assert total < 6 * 1024 * 1024


def test_corpus_documents():
    docs = list(iter_bundled_documents())
    assert len(docs) > 1000
    assert {d["source"] for d in docs} == {"kjv", "shakespeare"}
    assert docs[0]["title"] == "Genesis 1" and "In the beginning" in docs[0]["text"]
    assert sum(len(d["text"]) for d in docs) > 4_000_000
    assert all(d["text"].strip() for d in docs)


def test_tokenizer_special_tokens(tokenizer):
    for name, expected in [
        ("<|endoftext|>", 0),
        ("<|pad|>", 1),
        ("[MASK]", 2),
        ("<|user|>", 3),
        ("<|assistant|>", 4),
        ("<|system|>", 5),
    ]:
        assert tokenizer.token_to_id(name) == expected
    config = json.load(open(os.path.join(bundled_tokenizer_dir(), "tokenizer_config.json")))
    assert config["eos_token"] == "<|endoftext|>" and config["mask_token"] == "[MASK]"


def test_chat_set_is_valid():
    with gzip.open(bundled_chat_path(), "rt") as f:
        convs = [json.loads(line) for line in f]
    assert 100 <= len(convs) <= 200
    for conv in convs:
        roles = [m["role"] for m in conv["messages"]]
        assert roles[-1] == "assistant" and set(roles) <= {"system", "user", "assistant"}
