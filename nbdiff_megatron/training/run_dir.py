"""A save directory that can be used from anywhere: what `nbdiff train` records in `checkpoint.save`.

Export, decoding and evaluation read a run through its checkpoints' metadata. So that they work from
any working directory and after the run's inputs move, the run records its paths absolute (in
`config.yaml` and in every checkpoint's train state), keeps a copy of its tokenizer in
`<save>/tokenizer/` (`nbdiff_megatron.data.tokenizer.tokenizer_in_run` finds it), and writes
`<save>/model.yaml`, the model section as `--model-config` takes it. Each start also writes the
config it runs (`config.yaml`) and appends one line to `runs.jsonl`: when, from what step and
checkpoint, with what command and where (`record_start`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from nbdiff_megatron.data.config import parse_blend
from nbdiff_megatron.data.tokenizer import copy_tokenizer
from nbdiff_megatron.training import checkpointing
from nbdiff_megatron.training.config import TrainConfig, dump_config

MODEL_FILE = "model.yaml"


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else path


def _absolute_blend(data_path: list[str]) -> list[str]:
    """Megatron blend syntax with every prefix absolute (weights kept)."""
    if not data_path:
        return data_path
    prefixes, weights = parse_blend(data_path)
    if weights is None:
        return [os.path.abspath(p) for p in prefixes]
    return [" ".join(f"{w:g} {os.path.abspath(p)}" for w, p in zip(weights, prefixes))]


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its data, tokenizer and checkpoint paths absolute (against this process's working
    directory, where the user typed them). A tokenizer path that does not exist here is kept as is."""
    data, ck = cfg.data, cfg.checkpoint
    tokenizer = data.tokenizer_model
    if tokenizer and os.path.exists(tokenizer):
        tokenizer = os.path.abspath(tokenizer)
    data = dataclasses.replace(
        data,
        data_path=_absolute_blend(data.data_path),
        sft_data_path=[os.path.abspath(p) for p in data.sft_data_path],
        tokenizer_model=tokenizer,
        data_cache_path=_absolute(data.data_cache_path),
    )
    ck = dataclasses.replace(ck, save=_absolute(ck.save), load=_absolute(ck.load))
    return dataclasses.replace(cfg, data=data, checkpoint=ck)


def record_run_files(save: str | Path, cfg: TrainConfig) -> None:
    """Rank 0, at each start: the tokenizer's copy and model.yaml beside the checkpoints."""
    save = Path(save)
    copy_tokenizer(cfg.data.tokenizer_model, save)
    header = "# The model section of this run (nbdiff train); --model-config takes this file.\n"
    model = yaml.safe_dump({"model": cfg.model.to_dict()}, sort_keys=False)
    (save / MODEL_FILE).write_text(header + model)


def record_start(
    cfg: TrainConfig,
    job: dict[str, Any],
    start_step: int,
    loaded: str | None,
    command: str | None,
    *,
    was_complete: bool,
) -> None:
    """Rank 0, at each start with checkpoint.save: config.yaml, the run files (`record_run_files`)
    and a line in runs.jsonl. `was_complete`: the save directory held a completion marker of a
    smaller train.steps, which is cleared (the run goes on, no longer complete)."""
    save = Path(cfg.checkpoint.save)
    save.mkdir(parents=True, exist_ok=True)
    (save / "config.yaml").write_text(dump_config(cfg))
    record_run_files(save, cfg)
    if was_complete:
        checkpointing.clear_completion_marker(save)
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "start_step": start_step,
        "loaded": loaded,
        "command": command,
        **job,
    }
    with (save / "runs.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
