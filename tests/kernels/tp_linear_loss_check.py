"""Run under torchrun (2 ranks, gloo): the vocab-parallel fused loss equals the 1-rank reference.

Every rank builds the same full hidden states and padded output weight, computes the reference
(`nbdiff_loss` on the full logits) locally, and the fused loss on its vocabulary shard with the
world as the TP group -- plain, with the sequence-parallel layout (hidden split along the
sequence) and projecting the padded shard (`project_padded`). Loss values, hidden gradients and this rank's weight-gradient shard must match.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from nbdiff_megatron.kernels import nbdiff_linear_loss
from nbdiff_megatron.method.losses import nbdiff_loss
from nbdiff_megatron.method.masks import document_positions
from nbdiff_megatron.method.noise import mask_tokens

B, L, H, V, PADDED = 2, 16, 8, 50, 64


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    x0 = torch.randint(0, V - 1, (B, L))
    t = torch.rand(B, L) * 0.8 + 0.2
    doc_ids = torch.tensor([0] * 9 + [1] * 7)
    _, masked = mask_tokens(
        x0,
        t[:, 0],
        block_size=4,
        mask_id=V - 1,
        token_shift=True,
        positions=document_positions(doc_ids.expand(B, L)),
        generator=torch.Generator().manual_seed(1),
    )
    loss_mask = torch.rand(B, L) > 0.2
    hidden = torch.randn(B, 2 * L, H, dtype=torch.float64)
    weight = torch.randn(PADDED, H, dtype=torch.float64) * 0.5
    kwargs = dict(ar_weight=0.3, token_shift=True, loss_mask=loss_mask, doc_ids=doc_ids)

    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = nbdiff_loss((h_ref @ w_ref.t())[..., :V], x0, masked, t, **kwargs)
    ref.total.backward()

    shard = PADDED // world
    rows = slice(rank * shard, (rank + 1) * shard)
    worst = 0.0
    # The real columns of the shard, or the whole padded shard with the padding masked (rank 1
    # holds 18 real and 14 padding columns).
    for sequence_parallel, project_padded in ((False, False), (True, False), (False, True)):
        w = weight[rows].clone().requires_grad_()
        h = hidden.clone().requires_grad_()
        seq = 2 * L // world
        h_in = h[:, rank * seq : (rank + 1) * seq] if sequence_parallel else h
        fused = nbdiff_linear_loss(
            h_in,
            w,
            x0,
            masked,
            t,
            tp_group=dist.group.WORLD,
            vocab_size=V,
            sequence_parallel=sequence_parallel,
            project_padded=project_padded,
            **kwargs,
        )
        fused.total.backward()
        grad_h = h.grad
        if sequence_parallel:  # each rank holds its rows' gradient: gather them to compare
            grad_h = h.grad.clone()
            dist.all_reduce(grad_h)
        for name, a, b in (
            ("total", fused.total, ref.total),
            ("mdm", fused.mdm, ref.mdm),
            ("ar", fused.ar, ref.ar),
            ("grad_hidden", grad_h, h_ref.grad),
            ("grad_weight", w.grad, w_ref.grad[rows]),
        ):
            err = float((a - b).abs().max())
            worst = max(worst, err)
            print(
                f"rank {rank} sp={sequence_parallel} padded={project_padded} {name}: max abs "
                f"diff {err:.3e}"
            )
    # megatron DDP's gradient-accumulation fusion: the shard's d W lands in weight.main_grad.
    w = weight[rows].clone().requires_grad_()
    w.main_grad = torch.zeros_like(w)
    fused = nbdiff_linear_loss(
        hidden.clone().requires_grad_(),
        w,
        x0,
        masked,
        t,
        tp_group=dist.group.WORLD,
        vocab_size=V,
        accumulate_into_main_grad=True,
        **kwargs,
    )
    fused.total.backward()
    err = float((w.main_grad - w_ref.grad[rows]).abs().max())
    worst = max(worst, err, 0.0 if w.grad is None else float("inf"))
    print(f"rank {rank} main_grad grad_weight: max abs diff {err:.3e}")
    if worst > 1e-10:
        sys.exit(f"rank {rank}: fused TP loss differs from the reference by {worst}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
