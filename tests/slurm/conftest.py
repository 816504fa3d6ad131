"""A real SLURM cluster (two node names on this host) for the launcher tests, started once per module."""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .cluster import Cluster, SlurmUnavailable, ensure_installed


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    try:
        ensure_installed()
    except SlurmUnavailable as exc:
        if os.environ.get("CI"):
            raise  # CI runs as root with apt: the scheduler test must run there
        pytest.skip(f"no SLURM here: {exc}")
    # One test cluster at a time on this machine (test workers, other checkouts): a job's rendezvous
    # port is 20000 + its job id, and every test cluster numbers its jobs from 1.
    with open(os.path.join(tempfile.gettempdir(), "nbdiff-test-slurm.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        c = Cluster(tmp_path_factory.mktemp("slurm"))
        c.start()
        try:
            yield c
        finally:
            c.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The first 40 documents of the bundled corpus as an indexed dataset."""
    from nbdiff_megatron.data.bundled import prepare_bundled_corpus

    return prepare_bundled_corpus(str(tmp_path_factory.mktemp("corpus")), max_documents=40)


@pytest.fixture
def submit_dir(tmp_path: Path) -> Path:
    """A folder outside the repository to submit from (the launcher must not need the repo root)."""
    d = tmp_path / "submit"
    d.mkdir()
    return d
