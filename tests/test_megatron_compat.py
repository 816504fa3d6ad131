"""megatron-core compatibility: fields it does not know are errors; its import-time noise is dropped."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nbdiff_megatron.errors import CompatibilityError
from tests.launch import REPO, clean_env


def test_an_unknown_transformer_config_field_is_an_error_not_dropped() -> None:
    from nbdiff_megatron.model.config import ModelConfig

    cfg = ModelConfig(vocab_size=100, extra_transformer_config={"no_such_field_xyz": 1})
    with pytest.raises(CompatibilityError, match=r"no_such_field_xyz.*model\.extra_transformer"):
        cfg.to_transformer_config()


def test_an_unknown_dataset_config_field_is_an_error_not_dropped() -> None:
    from nbdiff_megatron.data.megatron_io import gpt_dataset_config

    with pytest.raises(CompatibilityError, match=r"GPTDatasetConfig field\(s\) renamed_field"):
        gpt_dataset_config(random_seed=1, sequence_length=8, renamed_field=True)


def test_megatron_core_imports_quietly() -> None:
    code = (
        "from nbdiff_megatron.megatron_compat import quiet_megatron; quiet_megatron(); "
        "import megatron.core.optimizer, megatron.core.models.gpt, megatron.core.distributed"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=clean_env()
    )
    assert done.returncode == 0, done.stderr
    assert "not installed" not in done.stderr and "Warning" not in done.stderr, done.stderr
