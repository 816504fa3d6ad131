"""Checkpoint I/O, below training, inference and conversion.

- `dist.py`: megatron-core dist checkpoints as files (names, find, list, integrity, common state, write).
- `hf_io.py`: HF safetensors folders (read by tensor, sharded writing).
- `families.py`, `tables.py`, `transforms.py`: the HF <-> megatron-core tensor tables per model family.
- `mcore_io.py`: streaming megatron-core side of a conversion (meta-device template, staged tensors).
- `hf_to_mcore.py`, `api.py`: HF -> megatron-core (a checkpoint on disk, or weights into a built model).
The export application (megatron-core -> HF with the decoder) is `nbdiff_megatron/convert/`.
"""
