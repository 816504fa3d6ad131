#!/usr/bin/env python
"""Checkpoint conversion under the name Megatron users look for: forwards to `nbdiff convert`.

python tools/convert_checkpoint.py hf-to-mcore --hf Qwen3-4B-Base/ --out ckpt/qwen3-4b --tp 2
python tools/convert_checkpoint.py mcore-to-hf --mcore runs/phase1 --out hf/nbdiff-4b
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nbdiff_megatron.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
