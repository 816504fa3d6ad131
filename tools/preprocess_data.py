#!/usr/bin/env python
"""Megatron-LM's tools/preprocess_data.py, for muscle memory: forwards to `nbdiff preprocess`.

    python tools/preprocess_data.py --input data.jsonl --output-prefix out/corpus \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok/ --append-eod --workers 8
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nbdiff_megatron.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
