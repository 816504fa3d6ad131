"""User errors name what is wrong, and a failed conversion leaves nothing at --out."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nbdiff_megatron.cli import main as nbdiff_main
from nbdiff_megatron.convert import hf_to_mcore, mcore_to_hf
from nbdiff_megatron.errors import CheckpointError, ConversionError

from .conftest import build_hf_model, hf_logits


def _edit_weights(hf_dir, edit):
    tensors = load_file(hf_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})


def _nothing_left(parent, name="mcore"):
    leftovers = [p.name for p in parent.iterdir() if name in p.name]
    assert leftovers == [], leftovers


@pytest.fixture
def llama_dir(tmp_path):
    build_hf_model("llama_untied", tmp_path / "hf")
    return tmp_path / "hf"


def test_unsupported_architecture_lists_supported(llama_dir, tmp_path):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError) as err:
        hf_to_mcore(llama_dir, tmp_path / "mcore", show_progress=False)
    message = str(err.value)
    assert "GPT2LMHeadModel" in message
    for arch in ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM"):
        assert arch in message
    _nothing_left(tmp_path)


@pytest.mark.parametrize(
    "field,value", [("hidden_act", "gelu"), ("mlp_bias", True), ("attention_bias", True)]
)
def test_unsupported_options_are_named(llama_dir, tmp_path, field, value):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg[field] = value
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=field):
        hf_to_mcore(llama_dir, tmp_path / "mcore", show_progress=False)


def test_missing_unexpected_and_misshaped_tensors_are_listed(llama_dir, tmp_path, one_rank):
    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)

    _edit_weights(llama_dir, edit)
    with pytest.raises(ConversionError) as err:
        hf_to_mcore(llama_dir, tmp_path / "mcore", show_progress=False)
    message = str(err.value)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected tensors: model.layers.0.self_attn.extra.weight" in message
    assert "model.layers.0.self_attn.k_proj.weight (8, 64) (expected (32, 64))" in message
    _nothing_left(tmp_path)


def test_failure_midway_leaves_nothing(llama_dir, tmp_path, one_rank, monkeypatch):
    from nbdiff_megatron.checkpoint import mcore_io

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mcore_io, "save_checkpoint_dir", broken_save)
    with pytest.raises(OSError, match="disk full"):
        hf_to_mcore(llama_dir, tmp_path / "mcore", show_progress=False)
    _nothing_left(tmp_path)


def test_existing_out_needs_overwrite(llama_dir, tmp_path, one_rank):
    (tmp_path / "mcore").mkdir()
    (tmp_path / "mcore" / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="--overwrite"):
        hf_to_mcore(llama_dir, tmp_path / "mcore", show_progress=False)
    assert (tmp_path / "mcore" / "keep.txt").is_file()
    hf_to_mcore(llama_dir, tmp_path / "mcore", overwrite=True, show_progress=False)
    assert not (tmp_path / "mcore" / "keep.txt").exists()
    assert (tmp_path / "mcore" / "latest").is_file()


def test_bad_layout_and_missing_checkpoint(llama_dir, tmp_path, one_rank):
    with pytest.raises(ConversionError, match="--tp 3") as err:
        hf_to_mcore(llama_dir, tmp_path / "mcore", tp=3, show_progress=False)
    # The advice is what a converter can do (4 heads, 2 query groups, 2 layers), not a new shape.
    assert "use --tp 1 / 2 and --pp 1 / 2" in str(err.value)
    assert "change model.num_attention_heads" not in str(err.value)
    with pytest.raises(CheckpointError):
        mcore_to_hf(tmp_path / "nowhere", tmp_path / "hf_out", show_progress=False)


def test_mcore_side_missing_and_misshaped_tensors(llama_dir, tmp_path, one_rank):
    """A checkpoint whose recorded config disagrees with its tensors is refused, listing them."""
    import yaml

    hf_to_mcore(llama_dir, tmp_path / "mcore", show_progress=False)
    model = yaml.safe_load((tmp_path / "mcore" / "model.yaml").read_text())["model"]
    model.update(ffn_hidden_size=128, qk_layernorm=True)
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump({"model": model}))
    with pytest.raises(ConversionError) as err:
        mcore_to_hf(
            tmp_path / "mcore",
            tmp_path / "hf_out",
            model_config=str(tmp_path / "wrong.yaml"),
            show_progress=False,
        )
    message = str(err.value)
    assert "missing tensors" in message and "q_layernorm" in message
    assert "wrongly shaped tensors" in message and "linear_fc2.weight" in message
    _nothing_left(tmp_path, "hf_out")


def test_openpangu_style_checkpoint(tmp_path, one_rank):
    """PanguEmbedded config (bias=True): q/k/v bias kept, zero o_proj bias dropped, else refused."""
    model = build_hf_model("qwen2_tied", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.update(model_type="PanguEmbedded", architectures=["PanguEmbeddedForCausalLM"], bias=True)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    _edit_weights(
        tmp_path / "hf",
        lambda t: t.update(
            {f"model.layers.{i}.self_attn.o_proj.bias": torch.zeros(64) for i in range(2)}
        ),
    )
    summary = hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", show_progress=False)
    assert summary.family == "openpangu"
    assert any("o_proj" in note for note in summary.notes)
    mcore_to_hf(tmp_path / "mcore", tmp_path / "export", show_progress=False)
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(exported).__name__ == "Qwen2ForCausalLM"
    ids = torch.randint(0, 4101, (1, 10))
    assert torch.equal(hf_logits(exported, ids), hf_logits(model, ids))

    _edit_weights(
        tmp_path / "hf",
        lambda t: t.update({"model.layers.1.self_attn.o_proj.bias": torch.ones(64)}),
    )
    with pytest.raises(ConversionError, match="o_proj.bias is not zero"):
        hf_to_mcore(tmp_path / "hf", tmp_path / "mcore2", show_progress=False)
    _nothing_left(tmp_path, "mcore2")


def test_cli_and_tools_forwarder(llama_dir, tmp_path, capsys, one_rank):
    code = nbdiff_main(
        [
            "convert",
            "hf-to-mcore",
            "--hf",
            str(llama_dir),
            "--out",
            str(tmp_path / "mcore"),
            "--no-progress",
        ]
    )
    assert code == 0
    assert "hf-to-mcore" in capsys.readouterr().out
    code = nbdiff_main(
        [
            "convert",
            "mcore-to-hf",
            "--mcore",
            str(tmp_path / "mcore"),
            "--out",
            str(tmp_path / "export"),
            "--dtype",
            "bf16",
            "--no-progress",
        ]
    )
    assert code == 0
    assert (
        load_file(tmp_path / "export" / "model.safetensors")["model.norm.weight"].dtype
        == torch.bfloat16
    )
    # A user error is printed without a traceback and exits 2.
    code = nbdiff_main(
        ["convert", "hf-to-mcore", "--hf", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]
    )
    assert code == 2
    assert "is not a directory" in capsys.readouterr().err
