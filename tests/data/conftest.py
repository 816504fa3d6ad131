"""Shared fixtures: the bundled tokenizer and a small indexed dataset made from the bundled corpus."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from nbdiff_megatron.data.bundled import (  # noqa: E402
    bundled_tokenizer_dir,
    bundled_tokenizer_path,
    prepare_bundled_corpus,
)
from nbdiff_megatron.data.tokenizer import load_tokenizer  # noqa: E402

# The first chapters of Genesis and more: enough documents for three splits of short samples.
SMALL_CORPUS_DOCS = 120


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("HuggingFaceTokenizer", bundled_tokenizer_path())


@pytest.fixture(scope="session")
def chat_tokenizer():
    return load_tokenizer("HuggingFaceTokenizer", bundled_tokenizer_dir())


@pytest.fixture(scope="session")
def sample_texts():
    """The first 60 bundled documents' texts (for training throw-away tokenizers)."""
    from nbdiff_megatron.data.bundled import iter_bundled_documents

    texts = []
    for doc in iter_bundled_documents():
        texts.append(doc["text"])
        if len(texts) == 60:
            break
    return texts


@pytest.fixture(scope="session")
def small_prefix(tmp_path_factory):
    """Indexed dataset of the first SMALL_CORPUS_DOCS bundled documents (EOD appended)."""
    out = tmp_path_factory.mktemp("bundled")
    return prepare_bundled_corpus(str(out), max_documents=SMALL_CORPUS_DOCS)
