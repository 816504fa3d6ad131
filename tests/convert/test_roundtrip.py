"""HF -> megatron-core -> AR forward matches HF logits; HF -> megatron-core -> HF is bit-identical."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nbdiff_megatron.convert import hf_to_mcore, mcore_to_hf
from nbdiff_megatron.errors import ConversionError
from nbdiff_megatron.model.config import ModelConfig

from .conftest import MODELS, build_hf_model, hf_logits, read_metadata


def _load_megatron(mcore_dir, **changes):
    """The NBDiff model built from the converted metadata and loaded the way training loads it."""
    import dataclasses

    from nbdiff_megatron.model.builder import build_model
    from nbdiff_megatron.training.checkpointing import load_checkpoint

    cfg = ModelConfig.from_dict(read_metadata(mcore_dir)["model"])
    cfg = dataclasses.replace(cfg, attention_backend="sdpa", **changes)
    model = build_model(cfg, seed=7)  # a different init: the load must overwrite everything
    load_checkpoint(mcore_dir, [model], None, weights_only=True)
    return model.eval()


def _ar_logits(model, ids):
    from nbdiff_megatron.model.builder import ar_forward

    with torch.no_grad():
        return ar_forward(model, ids).float()


def _hf_tensors(path):
    tensors = {}
    index = path / "model.safetensors.index.json"
    files = (
        set(json.loads(index.read_text())["weight_map"].values())
        if index.is_file()
        else {"model.safetensors"}
    )
    for f in files:
        tensors.update(load_file(path / f))
    return tensors


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_ar_forward_matches_hf_logits(kind, converted):
    hf_dir, mcore_dir, model = converted(kind)
    vocab = MODELS[kind][1]["vocab_size"]
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(model, ids)
    got = _ar_logits(_load_megatron(mcore_dir), ids)
    assert got.shape == ref.shape  # the bundled tokenizer's [MASK] (id 2) is inside the vocabulary
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_round_trip_is_identical(kind, converted, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir, mcore_dir, model = converted(kind)
    summary = mcore_to_hf(mcore_dir, tmp_path / "export", show_progress=False)
    original, exported = _hf_tensors(hf_dir), _hf_tensors(tmp_path / "export")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name
    assert summary.tensors == len(original)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    src_cfg, out_cfg = model.config, reloaded.config
    for field in (
        "vocab_size",
        "hidden_size",
        "num_key_value_heads",
        "tie_word_embeddings",
        "model_type",
    ):
        assert getattr(out_cfg, field) == getattr(src_cfg, field), field
    assert out_cfg.mask_token_id == 2
    ids = torch.randint(0, src_cfg.vocab_size, (1, 12))
    assert torch.equal(hf_logits(reloaded, ids), hf_logits(model, ids))
    assert (tmp_path / "export" / "tokenizer.json").is_file()


def test_metadata_and_layout(converted):
    hf_dir, mcore_dir, _ = converted("qwen3_untied")
    meta = read_metadata(mcore_dir)
    assert meta["architecture"]["family"] == "qwen3"
    assert meta["mask_id"] == 2 and meta["mask_rows_added"] == 0
    assert meta["tokenizer"]["mask_id"] == 2
    assert meta["tokenizer"]["tokenizer_model"] == str((mcore_dir / "tokenizer").resolve())
    assert meta["nbdiff"] == {
        "block_size": 32,
        "token_shift": True,
        "mask_kind": "context_causal",
        "block_align": "document",
    }
    cfg = ModelConfig.from_dict(meta["model"])
    assert (cfg.qk_layernorm, cfg.add_qkv_bias, cfg.tie_embeddings, cfg.kv_channels) == (
        True,
        False,
        False,
        None,
    )
    assert (mcore_dir / "latest").read_text().strip() == "0"
    assert (mcore_dir / "iter_0000000" / "metadata.json").is_file()
    assert (mcore_dir / "tokenizer" / "tokenizer.json").is_file()
    assert "model:" in (mcore_dir / "model.yaml").read_text()
    assert not (mcore_dir / ".staging").exists()


def test_bf16_round_trip_and_tp2_padding(tmp_path, one_rank):
    """bf16 stays bit-identical; a checkpoint padded for TP=2 loads (resharded) at TP=1."""
    model = build_hf_model("qwen2_tied", tmp_path / "hf", dtype=torch.bfloat16)
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", tp=2, show_progress=False)
    meta = read_metadata(tmp_path / "mcore")
    assert meta["dtype"] == "bf16" and meta["layout"] == {"tp": 2, "pp": 1}
    mcore_to_hf(tmp_path / "mcore", tmp_path / "export", show_progress=False)
    original, exported = _hf_tensors(tmp_path / "hf"), _hf_tensors(tmp_path / "export")
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[n], exported[n]) for n in original)
    # bf16 weights in an fp32 megatron model: exactly the HF model's weights, upcast.
    ids = torch.randint(0, 4101, (1, 16))
    ref = hf_logits(model.float(), ids)
    torch.testing.assert_close(
        _ar_logits(_load_megatron(tmp_path / "mcore"), ids), ref, rtol=0, atol=1e-4
    )


def test_added_mask_row_without_tokenizer(tmp_path, one_rank):
    """No tokenizer: [MASK] gets a new row (mean embedding); the export carries it."""
    model = build_hf_model("llama_untied", tmp_path / "hf", tokenizer=None)
    summary = hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", show_progress=False)
    assert summary.mask_id == 4097
    meta = read_metadata(tmp_path / "mcore")
    assert meta["mask_rows_added"] == 1 and meta["model"]["vocab_size"] == 4098
    ids = torch.randint(0, 4097, (1, 16))
    got = _ar_logits(_load_megatron(tmp_path / "mcore"), ids)
    assert got.shape[-1] == 4098
    torch.testing.assert_close(got[..., :4097], hf_logits(model, ids), rtol=0, atol=1e-4)
    # An export without its tokenizer is incomplete: refused unless asked for (--no-tokenizer).
    with pytest.raises(ConversionError, match="no tokenizer files found.*--no-tokenizer"):
        mcore_to_hf(tmp_path / "mcore", tmp_path / "export", show_progress=False)
    assert not (tmp_path / "export").exists()
    mcore_to_hf(
        tmp_path / "mcore", tmp_path / "export", show_progress=False, include_tokenizer=False
    )
    exported = _hf_tensors(tmp_path / "export")
    embed = model.get_input_embeddings().weight.detach()
    assert exported["model.embed_tokens.weight"].shape == (4098, 64)
    assert torch.equal(exported["model.embed_tokens.weight"][:4097], embed)
    torch.testing.assert_close(exported["model.embed_tokens.weight"][4097], embed.mean(0))
    notes = " ".join(summary.notes)
    assert "no tokenizer" in notes and "added 1 embedding row" in notes


def test_sharded_export(converted, tmp_path):
    """A small --max-shard-size writes several shards and an index that transformers reads."""
    from transformers import AutoModelForCausalLM

    hf_dir, mcore_dir, model = converted("llama_untied")
    mcore_to_hf(mcore_dir, tmp_path / "export", max_shard_size="300KB", show_progress=False)
    index = json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(0, 4097, (1, 8))
    assert torch.equal(hf_logits(reloaded, ids), hf_logits(model, ids))


def test_in_memory_hf_loader_matches(converted, tmp_path):
    """convert.api.load_hf_into_model (used by `nbdiff generate --load HF`) gives the HF logits."""
    from nbdiff_megatron.checkpoint.api import load_hf_into_model
    from nbdiff_megatron.model.builder import build_model

    hf_dir, mcore_dir, model = converted("qwen3_untied")
    mcore_to_hf(mcore_dir, tmp_path / "export", show_progress=False)
    loaded, cfg, info = load_hf_into_model(
        tmp_path / "export", vocab_size=4096, build=lambda c: build_model(c, seed=5)
    )
    assert info == {"mask_id": 2, "token_shift": True, "block_size": 32}
    ids = torch.randint(0, 4099, (1, 12))
    torch.testing.assert_close(
        _ar_logits(loaded.eval(), ids), hf_logits(model, ids), rtol=0, atol=1e-4
    )
