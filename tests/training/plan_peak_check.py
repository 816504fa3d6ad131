"""Peak memory of one forward + backward of the NBDiff model and loss (run as a subprocess).

`python tests/training/plan_peak_check.py L FUSED [RECOMPUTE]` prints one JSON line: the peak RSS of
this process (bytes; counted from after building the model: VmHWM reset) while running x_t ⊕ x_0 forward, the loss
(fused or reference) and backward, and the bytes autograd kept for backward (saved tensors).
The configuration is PEAK_MODEL below; `nbdiff plan`'s activation + loss model is compared with the
difference of two such peaks (tests/training/test_plan.py).
"""

from __future__ import annotations

import json
import resource
import sys

import torch

import nbdiff_megatron

PEAK_MODEL = dict(
    num_layers=2,
    hidden_size=256,
    ffn_hidden_size=768,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=32000,
    attention_backend="sdpa",
    tie_embeddings=True,
)
BATCH = 1


def _reset_peak() -> bool:
    """Start the peak-RSS count here (Linux: writing 5 to clear_refs resets VmHWM), so that a
    transient peak of the imports or of building the model cannot hide the step's own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss(reset: bool) -> int:
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    nbdiff_megatron.install_compat()  # as the `nbdiff` command does (docs/ARCHITECTURE.md)

    from nbdiff_megatron.kernels import nbdiff_linear_loss
    from nbdiff_megatron.method.losses import nbdiff_loss
    from nbdiff_megatron.model.builder import build_model, nbdiff_forward
    from nbdiff_megatron.model.config import ModelConfig

    length, fused = int(sys.argv[1]), sys.argv[2] == "1"
    recompute = sys.argv[3] if len(sys.argv) > 3 else "none"
    extra = {}
    if recompute == "selective":
        extra = dict(recompute_granularity="selective")
    elif recompute == "full":
        extra = dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    torch.set_num_threads(1)
    cfg = ModelConfig(seq_length=length, **PEAK_MODEL, **extra)
    model = build_model(cfg, block_size=4, seed=0)
    gen = torch.Generator().manual_seed(0)
    vocab = cfg.vocab_size
    x0 = torch.randint(0, vocab - 1, (BATCH, length), generator=gen)
    masked = torch.rand(BATCH, length, generator=gen) < 0.5
    x_t = torch.where(masked, torch.full_like(x0, vocab - 1), x0)
    t = torch.full((BATCH,), 0.5)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    baseline = _reset_peak()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = nbdiff_forward(model, x_t, x0, block_size=4, return_hidden=fused)
        model_saved = sum(saved.values())
        if fused:
            weight = model.shared_embedding_or_output_weight()
            terms = nbdiff_linear_loss(out, weight, x0, masked, t, ar_weight=0.5, vocab_size=vocab)
        else:
            terms = nbdiff_loss(out, x0, masked, t, ar_weight=0.5)
    terms.total.backward()
    peak = _peak_rss(baseline)
    print(
        json.dumps(
            dict(
                length=length,
                fused=fused,
                recompute=recompute,
                peak_rss=peak,
                model_saved=model_saved,
                all_saved=sum(saved.values()),
            )
        )
    )


if __name__ == "__main__":
    main()
