"""HF <-> megatron-core checkpoint conversion (Qwen3, Qwen2, Llama; openPangu-style).

`hf_to_mcore(hf_dir, out_dir, ...)` and `mcore_to_hf(mcore_dir, out_dir, ...)` are the two entry points
(`nbdiff convert hf-to-mcore | mcore-to-hf` on the command line). Each family is a declarative tensor
table (`families.py`) over a few named transforms (`transforms.py`).
"""

from nbdiff_megatron.checkpoint.hf_to_mcore import hf_to_mcore
from nbdiff_megatron.convert.mcore_to_hf import mcore_to_hf

__all__ = ["hf_to_mcore", "mcore_to_hf"]
