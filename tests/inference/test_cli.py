"""`nbdiff generate` end to end on a checkpoint written the way `nbdiff train` writes it; load errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nbdiff_megatron.cli import main
from nbdiff_megatron.errors import InferenceError


def test_load_megatron_checkpoint_gives_same_model(trained_checkpoint):
    import torch

    from nbdiff_megatron.inference.loading import load_for_inference

    save, model, tok = trained_checkpoint
    loaded = load_for_inference(save)
    assert loaded.block_size == 8 and loaded.token_shift and loaded.mask_id == tok.mask_id
    assert loaded.mask_kind == "context_causal"  # train_state without curriculum.mask_kind
    assert tok.eod in loaded.eos_ids
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


def test_generate_streams_and_writes_jsonl(trained_checkpoint, tmp_path, capsys):
    save, _, _ = trained_checkpoint
    assert (
        main(
            [
                "generate",
                "--load",
                str(save),
                "--prompt",
                "The king said",
                "--max-new-tokens",
                "12",
                "--threshold",
                "0.5",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.startswith("The king said")
    assert "tokens/forward" in captured.err
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["And God", "Thou art", "Yea"]))
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "generate",
                "--load",
                str(save),
                "--input",
                str(prompts),
                "--output",
                str(out),
                "--max-new-tokens",
                "10",
                "--batch-size",
                "2",
                "--sub-block-size",
                "4",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["And God", "Thou art", "Yea"]
    assert all(r["stop_reason"] in ("eos", "length") for r in records)
    assert (
        main(
            [
                "generate",
                "--load",
                str(save),
                "--input",
                str(prompts),
                "--output",
                str(out),
                "--max-new-tokens",
                "6",
                "--ar",
                "--quiet-stats",
            ]
        )
        == 0
    )


def test_generate_user_errors(trained_checkpoint, tmp_path, capsys):
    save, _, _ = trained_checkpoint
    assert main(["generate", "--load", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--load", str(save), "--prompt", ""]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["generate", "--load", str(save), "--prompt", "word " * 80]) == 2
    assert "context is 64" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    assert main(["generate", "--load", str(tmp_path / "junk"), "--prompt", "x"]) == 2
    assert "neither" in capsys.readouterr().err
    assert main(["generate", "--load", str(save), "--prompt", "x", "--sub-block-size", "3"]) == 2
    assert "sub_block_size" in capsys.readouterr().err


def test_unknown_path_raises_inference_error(tmp_path):
    from nbdiff_megatron.inference.loading import load_for_inference

    with pytest.raises(InferenceError, match="does not exist"):
        load_for_inference(tmp_path / "missing")


def test_eval_command_on_shipped_jsonl(trained_checkpoint, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from pathlib import Path

    save, _, _ = trained_checkpoint
    task = Path(__file__).parent / "assets" / "gsm8k_mini.jsonl"
    out = tmp_path / "results.json"
    assert (
        main(
            [
                "eval",
                "--load",
                str(save),
                "--task-jsonl",
                str(task),
                "--limit",
                "2",
                "--max-gen-toks",
                "8",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert "gsm8k_local" in capsys.readouterr().out
    assert "gsm8k_local" in json.loads(out.read_text())["results"]


def test_eval_without_lm_eval_says_how_to_install(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    assert main(["eval", "--load", "x", "--task-jsonl", "y"]) == 2
    assert "pip install" in capsys.readouterr().err


def test_load_hf_folder_matches_transformers(tmp_path):
    """An HF Llama folder loads (through the converter) into a model with the same causal logits."""
    import shutil

    import torch

    transformers = pytest.importorskip("transformers")

    from nbdiff_megatron.data.bundled import bundled_tokenizer_dir
    from nbdiff_megatron.inference.loading import load_for_inference
    from nbdiff_megatron.model.builder import ar_forward

    hf_dir = tmp_path / "hf"
    config = transformers.LlamaConfig(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(hf_dir, safe_serialization=True)
    for f in Path(bundled_tokenizer_dir()).iterdir():
        shutil.copy(f, hf_dir / f.name)
    # the `nbdiff` block `nbdiff convert mcore-to-hf` writes reaches the decoder
    hf_config = json.loads((hf_dir / "config.json").read_text())
    hf_config["nbdiff"] = {"block_size": 8, "token_shift": False, "mask_kind": "block_causal"}
    (hf_dir / "config.json").write_text(json.dumps(hf_config))
    loaded = load_for_inference(hf_dir)
    assert (loaded.block_size, loaded.token_shift, loaded.mask_kind) == (8, False, "block_causal")
    decoder = _decoder_for(loaded, ["--load", str(hf_dir)])
    assert decoder.config.mask_kind == "block_causal" and decoder.config.block_size == 8
    ids = torch.tensor([loaded.tokenizer.encode("And God said, Let there be light")])
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = ar_forward(loaded.model, ids)
    torch.testing.assert_close(got[..., : expected.shape[-1]], expected, rtol=0, atol=1e-4)
    assert (
        main(
            [
                "generate",
                "--load",
                str(hf_dir),
                "--prompt",
                "And God",
                "--max-new-tokens",
                "4",
                "--quiet-stats",
            ]
        )
        == 0
    )


def _decoder_for(loaded, argv):
    import argparse

    from nbdiff_megatron.inference.cli import add_arguments, build_decoder

    parser = argparse.ArgumentParser()
    add_arguments(parser, "generate")
    return build_decoder(parser.parse_args([*argv, "--prompt", "x"]), loaded, 4)


@pytest.mark.parametrize(
    "config, converted, expected",
    [
        ({}, {}, "context_causal"),
        ({"curriculum": {"mask_kind": "block_causal"}}, {}, "block_causal"),
        (
            {"curriculum": {"mask_kind": "context_causal"}},
            {"mask_kind": "block_causal"},
            "context_causal",
        ),
        ({}, {"nbdiff": {"mask_kind": "block_causal"}}, "block_causal"),
        ({}, {"mask_kind": "block_causal"}, "block_causal"),
    ],
)
def test_stored_mask_kind(config, converted, expected, tmp_path):
    from nbdiff_megatron.inference.loading import _stored_mask_kind

    assert _stored_mask_kind(config, converted, tmp_path) == expected


def test_stored_mask_kind_rejects_unknown_kinds(tmp_path):
    from nbdiff_megatron.errors import CheckpointError
    from nbdiff_megatron.inference.loading import _stored_mask_kind

    with pytest.raises(CheckpointError, match="mystery"):
        _stored_mask_kind({"curriculum": {"mask_kind": "mystery"}}, {}, tmp_path)
    # the annealed baseline ends on the context-causal mask and decodes as such
    assert _stored_mask_kind({"curriculum": {"mask_kind": "annealed"}}, {}, tmp_path) == (
        "context_causal"
    )


def test_block_causal_checkpoint_decodes_block_causally(tmp_path):
    """A checkpoint whose train config says curriculum.mask_kind = block_causal loads with that
    mask kind and `nbdiff generate` builds a block-causal decoder for it."""
    from nbdiff_megatron.data.bundled import bundled_tokenizer_path
    from nbdiff_megatron.data.tokenizer import load_tokenizer
    from nbdiff_megatron.inference.loading import load_for_inference
    from nbdiff_megatron.model.builder import build_model
    from nbdiff_megatron.model.config import ModelConfig
    from nbdiff_megatron.training import checkpointing

    tok_path = bundled_tokenizer_path()
    tok = load_tokenizer("HuggingFaceTokenizer", tok_path)
    cfg = ModelConfig(vocab_size=tok.vocab_size, seq_length=32, init_method_std=0.3)
    train_state = {
        "config": {
            "model": cfg.to_dict(),
            "loss": {"token_shift": True},
            "curriculum": {"target_block_size": 4, "mask_kind": "block_causal"},
            "noise": {"mask_token_id": None},
            "data": {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": tok_path},
        },
        "tokenizer": {"type": "HuggingFaceTokenizer", "model": tok_path},
    }
    checkpointing.save_checkpoint(tmp_path, 1, [build_model(cfg, seed=4)], None, train_state)
    loaded = load_for_inference(tmp_path)
    assert loaded.mask_kind == "block_causal" and loaded.block_size == 4
    decoder = _decoder_for(loaded, ["--load", str(tmp_path)])
    assert decoder.config.mask_kind == "block_causal"
    out = decoder.generate([tok.encode("And God said")], max_new_tokens=6)
    assert len(out.tokens[0]) <= 6


# ------------------------------------------------ decoding flags and input errors (issue 14)
def test_generate_prints_stop_reasons_and_new_flags(trained_checkpoint, capsys):
    save, _, _ = trained_checkpoint
    base = ["generate", "--load", str(save), "--prompt", "The king said", "--max-new-tokens", "9"]
    assert main(base + ["--block-align", "prompt", "--steps-per-block", "4"]) == 0
    err = capsys.readouterr().err
    assert "prompt-aligned" in err and "prompt 0 stopped at " in err
    assert main(base + ["--unmasking", "entropy_bounded", "--threshold", "2"]) == 0
    assert main(base + ["--temperature", "1", "--top-k", "5", "--seed", "3"]) == 0
    assert main(base + ["--steps-per-block", "4", "--unmasking", "margin"]) == 2
    assert "--steps-per-block applies" in capsys.readouterr().err


def test_generate_says_when_the_context_caps_max_new_tokens(trained_checkpoint, capsys):
    """Issue 25 (7): --max-new-tokens beyond the context is announced, the stop reason reads as a
    sentence; --no-fused-commit decodes the same text with more forwards."""
    save, _, _ = trained_checkpoint
    base = ["generate", "--load", str(save), "--prompt", "The king said", "--max-new-tokens", "99"]
    assert main(base) == 0
    fused = capsys.readouterr()
    assert "so it gets at most" in fused.err and "not --max-new-tokens 99" in fused.err
    assert "prompt 0 stopped at" in fused.err
    assert main(base + ["--no-fused-commit"]) == 0
    unfused = capsys.readouterr()
    assert unfused.out == fused.out
    forwards = [int(e.split(" forwards")[0].rsplit(" ", 1)[1]) for e in (fused.err, unfused.err)]
    assert forwards[0] <= forwards[1]


def test_block_size_errors_and_warning(trained_checkpoint, capsys):
    save, _, _ = trained_checkpoint
    base = ["generate", "--load", str(save), "--prompt", "The king", "--max-new-tokens", "4"]
    assert main(base + ["--block-size", "0"]) == 2
    assert "--block-size must be an integer >= 1" in capsys.readouterr().err
    assert main(base + ["--block-size", "16"]) == 0  # the checkpoint was trained with 8
    assert "larger than the block size the model was trained for (8)" in capsys.readouterr().err


def test_corrupt_checkpoint_names_the_file(trained_checkpoint, tmp_path, capsys):
    import shutil

    save, _, _ = trained_checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(save, bad)
    shard = sorted(bad.rglob("*.distcp"))[0]
    with open(shard, "r+b") as f:
        f.truncate(100)
    assert main(["generate", "--load", str(bad), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint file {shard} is truncated" in err and "Traceback" not in err
    assert main(["convert", "mcore-to-hf", "--mcore", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"checkpoint file {shard} is truncated" in capsys.readouterr().err


def test_truncated_safetensors_names_the_file(trained_checkpoint, tmp_path, capsys):
    save, _, _ = trained_checkpoint
    hf = tmp_path / "hf"
    assert main(["convert", "mcore-to-hf", "--mcore", str(save), "--out", str(hf)]) == 0
    weights = hf / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(5000)
    capsys.readouterr()
    assert main(["generate", "--load", str(hf), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert f"{weights} is not a readable safetensors file" in err
    out = tmp_path / "m"
    assert main(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(out)]) == 2
    assert f"{weights} is not a readable safetensors file" in capsys.readouterr().err
