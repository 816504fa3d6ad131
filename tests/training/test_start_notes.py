"""What `nbdiff train` says at start. `--model-config`: a converted checkpoint's model.yaml gives the
shape, the config keeps what it sets on purpose (phase 2's raised RoPE base), and every value that
changes is named in one line. A run without checkpoint.save says so at start and at the end."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from nbdiff_megatron.cli import main
from nbdiff_megatron.model.config import ModelConfig
from nbdiff_megatron.training.config import load_config
from tests.launch import DIST_VARS
from tests.training.runs import TINY, tiny_overrides

REPO = Path(__file__).resolve().parents[2]
PHASE2 = REPO / "examples" / "phase2_32k.yaml"


def _converted_model_yaml(tmp_path: Path, **changes) -> Path:
    """A model.yaml as `nbdiff convert hf-to-mcore` writes it: every ModelConfig field, the HF
    checkpoint's RoPE base (1e6, Qwen3's) included."""
    shape = ModelConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=8,
        num_query_groups=4,
        kv_channels=16,
        vocab_size=1000,
        rotary_base=1_000_000.0,
        qk_layernorm=True,
        **changes,
    )
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({"model": shape.to_dict()}, sort_keys=False))
    return path


def test_phase2_keeps_its_raised_rope_base_and_names_what_the_checkpoint_replaced(
    tmp_path: Path, capsys
) -> None:
    model_yaml = _converted_model_yaml(tmp_path)
    notes: list[str] = []
    cfg = load_config(PHASE2, model_file=model_yaml, notes=notes)
    assert cfg.model.rotary_base == 8_000_000  # the config's, not the checkpoint's 1e6
    assert cfg.model.seq_length == 32768
    assert cfg.model.hidden_size == 64 and cfg.model.qk_layernorm  # the checkpoint's shape
    (line,) = notes
    assert "kept the config's long-context rotary_base=8000000 (model.yaml: 1000000.0)" in line
    assert "hidden_size=64 (config: 4096)" in line and "num_layers=2 (config: 34)" in line

    # The CLI prints the same line once at start; --print-config shows the raised base.
    code = main(
        ["train", "--config", str(PHASE2), "--model-config", str(model_yaml), "--print-config"]
    )
    out, err = capsys.readouterr()
    assert code == 0
    printed = yaml.safe_load(out)
    assert printed["model"]["rotary_base"] == 8_000_000 and printed["model"]["hidden_size"] == 64
    assert err.count("--model-config") == 1 and "kept the config's long-context" in err


def test_a_config_without_a_rope_setting_takes_the_checkpoints(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    raw = yaml.safe_load(PHASE2.read_text())
    del raw["model"]["rotary_base"]
    config.write_text(yaml.safe_dump(raw))
    scaling = {"type": "llama3", "factor": 8.0}
    cfg = load_config(config, model_file=_converted_model_yaml(tmp_path, rope_scaling=scaling))
    assert cfg.model.rotary_base == 1_000_000.0 and cfg.model.rope_scaling == scaling


def test_an_identical_shape_prints_nothing(tmp_path: Path) -> None:
    model_yaml = _converted_model_yaml(tmp_path)
    config = tmp_path / "run.yaml"
    raw = yaml.safe_load(PHASE2.read_text())
    raw["model"] = {
        **yaml.safe_load(model_yaml.read_text())["model"],
        "seq_length": 32768,
        "rotary_base": 1_000_000.0,
    }
    config.write_text(yaml.safe_dump(raw))
    notes: list[str] = []
    cfg = load_config(config, model_file=model_yaml, notes=notes)
    assert notes == [] and cfg.model.seq_length == 32768


def test_a_run_without_checkpoint_save_says_so_at_start_and_end(corpus_prefix: str, capsys) -> None:
    for name in DIST_VARS:
        os.environ.pop(name, None)
    assert main(["train", "--config", TINY, *tiny_overrides(corpus_prefix, "--train.steps=1")]) == 0
    out = capsys.readouterr().out
    start, end = out.index("checkpoint.save is unset"), out.rindex("checkpoint.save is unset")
    assert start < out.index("nbdiff train:") < out.index("done:") < end
    assert "this run saves no checkpoint" in out and "this run saved no checkpoint" in out
