"""A save directory is self-contained: a run given relative paths records them absolute, keeps a copy of
its tokenizer and its model.yaml, and export and decoding work from another directory, after the run's
tokenizer source is gone and the run directory has moved."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from nbdiff_megatron.cli import main
from nbdiff_megatron.convert import mcore_to_hf
from nbdiff_megatron.data.bundled import bundled_tokenizer_dir
from nbdiff_megatron.data.tokenizer import copy_tokenizer, tokenizer_in_run
from nbdiff_megatron.inference.loading import load_megatron
from nbdiff_megatron.model.parallel import destroy_parallel
from tests.launch import DIST_VARS
from tests.training.runs import TINY, tiny_overrides


def test_a_run_moves_and_exports_from_anywhere(corpus_prefix: str, tmp_path: Path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(bundled_tokenizer_dir(), work / "tok")
    data = work / "data"
    data.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copyfile(corpus_prefix + suffix, data / f"corpus{suffix}")
    monkeypatch.chdir(work)
    for name in DIST_VARS:
        os.environ.pop(name, None)
    overrides = tiny_overrides(
        "data/corpus", "--train.steps=1", "--data.tokenizer_model=tok", "--save=run"
    )
    assert main(["train", "--config", TINY, *overrides]) == 0

    recorded = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert recorded["data"]["data_path"] == [str(data / "corpus")]
    assert recorded["data"]["tokenizer_model"] == str(work / "tok")
    assert recorded["checkpoint"]["save"] == str(work / "run")
    model = yaml.safe_load((work / "run" / "model.yaml").read_text())["model"]
    assert model["hidden_size"] == 64 and model["vocab_size"] > 0
    assert (work / "run" / "tokenizer" / "tokenizer.json").is_file()

    # The tokenizer's source is gone, the run moved, the user is elsewhere.
    shutil.rmtree(work / "tok")
    moved = tmp_path / "moved"
    shutil.move(str(work / "run"), moved)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    try:
        loaded = load_megatron(moved)
        assert loaded.tokenizer.encode("In the beginning")
    finally:
        destroy_parallel()
    summary = mcore_to_hf(moved, elsewhere / "hf", show_progress=False)
    assert (elsewhere / "hf" / "tokenizer.json").is_file()
    assert (elsewhere / "hf" / "generation_config.json").is_file()
    assert not any("tokenizer" in note for note in summary.notes)


def test_tokenizer_copy_of_a_file_and_of_a_folder(tmp_path: Path) -> None:
    folder = bundled_tokenizer_dir()
    # tokenizer.json named alone: its folder's config (chat template) travels with it
    copy = copy_tokenizer(os.path.join(folder, "tokenizer.json"), tmp_path / "a")
    assert sorted(os.listdir(copy)) == ["tokenizer.json", "tokenizer_config.json"]
    assert tokenizer_in_run(tmp_path / "a", "/gone/tokenizer.json") == os.path.join(
        copy, "tokenizer.json"
    )
    assert tokenizer_in_run(tmp_path / "a", "/gone/tokenizer") == copy
    spm = tmp_path / "spm.model"
    spm.write_bytes(b"x")
    copy = copy_tokenizer(str(spm), tmp_path / "b")
    assert tokenizer_in_run(tmp_path / "b", str(spm)) == os.path.join(copy, "spm.model")
    # nothing to copy: a run without a local tokenizer keeps what it recorded
    assert copy_tokenizer("", tmp_path / "c") is None
    assert tokenizer_in_run(tmp_path / "c", "recorded") == "recorded"
