"""Fixtures of the training tests (helpers are in runs.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def corpus_prefix(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The first 40 documents of the bundled corpus as an indexed dataset (a few seconds, once)."""
    from nbdiff_megatron.data.bundled import prepare_bundled_corpus

    return prepare_bundled_corpus(str(tmp_path_factory.mktemp("corpus")), max_documents=40)
