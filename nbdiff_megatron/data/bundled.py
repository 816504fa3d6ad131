"""The corpus, tokenizer and chat set shipped in nbdiff_megatron/assets (provenance: its README).

Used by the demo and the tests, so nothing is ever downloaded from a model or data hub.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path

from nbdiff_megatron.data.preprocess import output_prefix_for, preprocess, read_sidecar
from nbdiff_megatron.errors import ConfigError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_TOKENIZER_TYPE = "HuggingFaceTokenizer"


def example_config(name: str) -> Path:
    """An example config (e.g. "tiny_cpu.yaml"): the copy a built package holds in
    assets/examples/ (setup.py puts it there), else the source checkout's examples/ folder."""
    for candidate in (ASSETS / "examples" / name, ASSETS.parents[1] / "examples" / name):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"example config {name} is neither in {ASSETS / 'examples'} (an installed package) nor in "
        f"{ASSETS.parents[1] / 'examples'} (a source checkout); reinstall the package"
    )


def bundled_corpus_path() -> str:
    """JSONL.gz of public-domain English: KJV chapters and Shakespeare scenes/sonnets ("text" key)."""
    return str(ASSETS / "corpus.jsonl.gz")


def bundled_tokenizer_path() -> str:
    """The byte-level BPE (4096 ids) trained on the corpus: tokenizer.json.

    Its folder (`os.path.dirname(...)`) is an HF tokenizer folder with a chat template.
    """
    return str(ASSETS / "tokenizer" / "tokenizer.json")


def bundled_tokenizer_dir() -> str:
    """The HF tokenizer folder (tokenizer.json + tokenizer_config.json with a chat_template)."""
    return str(ASSETS / "tokenizer")


def bundled_chat_path() -> str:
    """JSONL.gz of ~120 short conversations about KJV verses ("messages" with roles)."""
    return str(ASSETS / "chat.jsonl.gz")


def iter_bundled_documents() -> Iterator[dict]:
    """The corpus records ({"text", "source", "title"}) in file order."""
    with gzip.open(bundled_corpus_path(), "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def prepare_bundled_corpus(
    out_dir: str, workers: int = 1, max_documents: int | None = None, progress: bool = False
) -> str:
    """Preprocess the bundled corpus (EOD appended) into `out_dir`; return the dataset prefix.

    Reuses an earlier result in `out_dir` when it was made the same way. `max_documents` keeps
    only the first N documents (for fast tests).
    """
    os.makedirs(out_dir, exist_ok=True)
    name = "bundled" if max_documents is None else f"bundled{max_documents}"
    output_prefix = os.path.join(out_dir, name)
    prefix = output_prefix_for(output_prefix, "text")
    sidecar = read_sidecar(prefix)
    if (
        sidecar is not None
        and os.path.isfile(prefix + ".bin")
        and os.path.isfile(prefix + ".idx")
        and sidecar.get("tokenizer_model") == os.path.abspath(bundled_tokenizer_path())
    ):
        return prefix
    source = bundled_corpus_path()
    if max_documents is not None:
        source = os.path.join(out_dir, f"{name}_source.jsonl")
        with open(source, "w", encoding="utf-8") as f:
            for i, doc in enumerate(iter_bundled_documents()):
                if i >= max_documents:
                    break
                f.write(json.dumps(doc) + "\n")
    preprocess(
        inputs=[source],
        output_prefix=output_prefix,
        tokenizer_type=BUNDLED_TOKENIZER_TYPE,
        tokenizer_model=bundled_tokenizer_path(),
        json_keys=["text"],
        append_eod=True,
        workers=workers,
        progress=progress,
    )
    return prefix
