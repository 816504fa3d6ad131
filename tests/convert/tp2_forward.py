"""AR forward of a converted checkpoint under TP=2 (launched by test_tp2.py through torchrun).

usage: torchrun --nproc-per-node 2 tp2_forward.py MCORE_DIR IDS.pt OUT_LOGITS.pt
Loads the checkpoint the way `nbdiff train` does (dist_checkpointing reshards it to TP=2), runs the
causal forward on the saved ids, and rank 0 saves the gathered logits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import nbdiff_megatron


def main() -> None:
    nbdiff_megatron.install_compat()  # as the `nbdiff` command does (docs/ARCHITECTURE.md)

    from nbdiff_megatron.model.builder import ar_forward, build_model
    from nbdiff_megatron.model.config import ModelConfig
    from nbdiff_megatron.model.parallel import destroy_parallel, initialize_parallel
    from nbdiff_megatron.training.checkpointing import load_checkpoint

    mcore_dir, ids_path, out_path = map(Path, sys.argv[1:4])
    torch.set_num_threads(1)
    initialize_parallel(2, 1, 1, seed=5)
    meta = json.loads((mcore_dir / "nbdiff_metadata.json").read_text())
    cfg = ModelConfig.from_dict({**meta["model"], "attention_backend": "sdpa"})
    model = build_model(cfg, seed=11)
    load_checkpoint(mcore_dir, [model], None, weights_only=True)
    model.eval()
    with torch.no_grad():
        logits = ar_forward(model, torch.load(ids_path))
    if torch.distributed.get_rank() == 0:
        torch.save(logits.float(), out_path)
    destroy_parallel()


if __name__ == "__main__":
    main()
