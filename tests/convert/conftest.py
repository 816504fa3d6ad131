"""Tiny HF models built offline from configs, and their megatron-core conversions (cached per session)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
BUNDLED_TOKENIZER = ROOT / "nbdiff_megatron" / "assets" / "tokenizer"
# Vocabulary sizes: odd, and larger than the bundled tokenizer's 4096 tokens.
SHAPE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

# name -> (transformers config class, extra config fields)
MODELS = {
    "qwen3_untied": ("Qwen3Config", dict(vocab_size=4099, head_dim=16, tie_word_embeddings=False)),
    "qwen2_tied": ("Qwen2Config", dict(vocab_size=4101, tie_word_embeddings=True)),
    "llama_untied": ("LlamaConfig", dict(vocab_size=4097, tie_word_embeddings=False)),
    "llama_tied_mha": (
        "LlamaConfig",
        dict(vocab_size=4103, tie_word_embeddings=True, num_key_value_heads=4, rope_theta=5000.0),
    ),
}


def build_hf_model(
    kind: str,
    path: Path,
    *,
    dtype: torch.dtype = torch.float32,
    tokenizer: Path | None = BUNDLED_TOKENIZER,
    seed: int = 0,
    **overrides,
):
    """Save a random tiny HF model of `kind` (MODELS) to `path`; returns the model (eval mode)."""
    import transformers

    cls_name, extra = MODELS[kind]
    cfg = getattr(transformers, cls_name)(**{**SHAPE, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # norms and biases start at 1 / 0: randomise them so a mix-up shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    model = model.to(dtype).eval()
    model.save_pretrained(path)
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            shutil.copy(f, path / f.name)
    return model


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def read_metadata(mcore_dir: Path) -> dict:
    return json.loads((mcore_dir / "nbdiff_metadata.json").read_text())


@pytest.fixture(scope="session")
def converted(tmp_path_factory, one_rank):
    """kind -> (hf_dir, mcore_dir, hf model): each tiny model converted once per session (fp32)."""
    from nbdiff_megatron.convert import hf_to_mcore

    cache: dict[str, tuple[Path, Path, object]] = {}

    def get(kind: str):
        if kind not in cache:
            base = tmp_path_factory.mktemp(kind)
            model = build_hf_model(kind, base / "hf")
            hf_to_mcore(base / "hf", base / "mcore", dtype="fp32", show_progress=False)
            cache[kind] = (base / "hf", base / "mcore", model)
        return cache[kind]

    return get
