"""The config sections owned by other packages, imported in one place.

`model` is `nbdiff_megatron.model.config.ModelConfig`; `data` is `nbdiff_megatron.data.config.DataConfig`.
"""

from __future__ import annotations

from nbdiff_megatron.data.config import DataConfig
from nbdiff_megatron.model.config import ModelConfig

__all__ = ["DataConfig", "ModelConfig"]
