"""A converted model fine-tuned by `nbdiff train` exports to HF and reloads in transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from nbdiff_megatron.convert import hf_to_mcore, mcore_to_hf
from tests.launch import clean_env

from .conftest import build_hf_model, hf_logits

pytest.importorskip("nbdiff_megatron.training.loop", reason="the training loop is not there yet")


def test_trained_checkpoint_exports_and_reloads(tmp_path, one_rank):
    from transformers import AutoModelForCausalLM

    from nbdiff_megatron.data.bundled import bundled_tokenizer_path, prepare_bundled_corpus

    source = build_hf_model("qwen3_untied", tmp_path / "hf")
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", show_progress=False)
    prefix = prepare_bundled_corpus(str(tmp_path / "data"), max_documents=40)
    model = yaml.safe_load((tmp_path / "mcore" / "model.yaml").read_text())["model"]
    model.update(seq_length=32, attention_backend="sdpa")
    config = {
        "model": model,
        "data": {
            "data_path": [prefix],
            "tokenizer_type": "HuggingFaceTokenizer",
            "tokenizer_model": bundled_tokenizer_path(),
            "split": "100,0,0",
        },
        "curriculum": {"start_block_size": 1, "target_block_size": 4, "growth_interval": 1},
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3},
        "schedule": {"style": "constant"},
        "train": {"steps": 2, "micro_batch_size": 2, "global_batch_size": 2, "precision": "fp32"},
        "checkpoint": {
            "save": str(tmp_path / "run"),
            "load": str(tmp_path / "mcore"),
            "finetune": True,
            "save_interval": 2,
        },
        "logging": {"progress_bar": False},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    # This process's 1-rank group set MASTER_PORT & co.; the child must start its own.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nbdiff_megatron.cli",
            "train",
            "--config",
            str(tmp_path / "train.yaml"),
        ],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = mcore_to_hf(tmp_path / "run", tmp_path / "export", show_progress=False)
    assert summary.family == "qwen3" and summary.mask_id == 2
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    trained = exported.state_dict()
    # Training moved the weights, and the export is the trained model, not the source.
    assert not torch.equal(
        trained["model.layers.0.mlp.up_proj.weight"],
        source.state_dict()["model.layers.0.mlp.up_proj.weight"],
    )
    # The exported HF model computes what the trained megatron model computes.
    import dataclasses

    from nbdiff_megatron.model.builder import ar_forward, build_model
    from nbdiff_megatron.model.config import ModelConfig
    from nbdiff_megatron.training.checkpointing import load_checkpoint

    cfg = dataclasses.replace(ModelConfig.from_dict(model), vocab_size=4099)
    megatron_model = build_model(cfg, seed=3).eval()
    load_checkpoint(tmp_path / "run", [megatron_model], None, weights_only=True)
    ids = torch.randint(0, 4096, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(
            ar_forward(megatron_model, ids).float(), hf_logits(exported, ids), rtol=0, atol=1e-4
        )
    assert (tmp_path / "export" / "tokenizer.json").is_file()
