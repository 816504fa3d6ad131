"""Context parallel (CP=2, optionally TP=2 x CP=2) vs 1 rank, through get_forward_backward_func.

Usage: python -m torch.distributed.run --nproc-per-node 2 tests/model/cp_multirank_check.py --mode cp
       python -m torch.distributed.run --nproc-per-node 4 tests/model/cp_multirank_check.py --mode tpcp
       (or --mode ppcp: PP=2 x CP=2, 4 ranks)

Every rank first runs the 1-rank reference (the ranks being data-parallel replicas of the same
computation): the NBDiff loss (`nbdiff_loss` with the global denominators, token shift, packed documents,
a block size that does not divide the CP chunk length) on full micro-batches. It then rebuilds
parallel_state with CP=2 (and TP=2 in `tpcp`, PP=2 in `ppcp`), loads the same full weights, feeds each rank its zigzag
shard (`nbdiff_model_inputs(cp_layout=...)`), computes `cp_local_loss` on the local logit rows, reduces
the gradients over the CP group as megatron's DDP would, and compares the loss (summed over CP ranks)
and the gradients gathered back into the full layout. Prints one `RESULT {json}` line per rank (and
writes it to `--out/result_<rank>.json`); exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from multirank_check import full_gradients  # noqa: E402  (sibling script, same folder)

import nbdiff_megatron  # noqa: E402

nbdiff_megatron.install_compat()  # as the `nbdiff` command does (docs/ARCHITECTURE.md)

from nbdiff_megatron.megatron_compat import cuda_to_cpu  # noqa: E402
from nbdiff_megatron.method.losses import loss_token_counts, nbdiff_loss  # noqa: E402
from nbdiff_megatron.method.masks import document_positions  # noqa: E402
from nbdiff_megatron.method.noise import mask_tokens  # noqa: E402
from nbdiff_megatron.model.builder import build_model, nbdiff_forward, nbdiff_model_inputs  # noqa: E402
from nbdiff_megatron.model.config import ModelConfig  # noqa: E402
from nbdiff_megatron.model.context_parallel import (  # noqa: E402
    ContextParallelLayout,
    cp_local_loss,
    gather_cp_sequence,
)
from nbdiff_megatron.model.parallel import (  # noqa: E402
    destroy_parallel,
    initialize_parallel,
    load_full_state_dict,
    reduce_context_parallel_grads,
    reduce_tensor_parallel_replicated_grads,
)

L, BATCH, MICRO, VOCAB, BLOCK, AR_WEIGHT = 16, 4, 2, 100, 3, 0.4
MASK_ID = VOCAB - 1
TOL = 1e-5


def config() -> ModelConfig:
    return ModelConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=VOCAB,
        seq_length=L,
        attention_backend="sdpa",
        qk_layernorm=True,
    )


def micro_batches() -> list[dict]:
    """Packed documents; token shift masking (a block's first token is never masked)."""
    gen = torch.Generator().manual_seed(99)
    x0 = torch.randint(0, VOCAB - 1, (BATCH, L), generator=gen)
    docs = torch.tensor(
        [[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 7, [0] * 16, [0] * 3 + [1] * 13]
    )
    t = torch.rand(BATCH, generator=gen) * 0.8 + 0.2
    xt, masked = mask_tokens(
        x0,
        t,
        block_size=BLOCK,
        mask_id=MASK_ID,
        token_shift=True,
        generator=gen,
        positions=document_positions(docs),
    )
    t_token = t.unsqueeze(1).expand(BATCH, L).contiguous()
    loss_mask = torch.ones(BATCH, L, dtype=torch.bool)
    loss_mask[1, :4] = False  # a prompt: no loss there
    out = []
    for i in range(0, BATCH, MICRO):
        out.append(
            {
                "x0": x0[i : i + MICRO],
                "xt": xt[i : i + MICRO],
                "masked": masked[i : i + MICRO],
                "t": t_token[i : i + MICRO],
                "docs": docs[i : i + MICRO],
                "loss_mask": loss_mask[i : i + MICRO],
            }
        )
    return out


def global_denominators(batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    mdm, ar = torch.zeros(()), torch.zeros(())
    for mb in batches:
        m, a = loss_token_counts(mb["x0"], loss_mask=mb["loss_mask"], doc_ids=mb["docs"])
        mdm, ar = mdm + m, ar + a
    return mdm, ar


def forward_step(data_iterator, model, *, denominators, layout):
    mb = next(data_iterator)
    inputs = nbdiff_model_inputs(
        mb["xt"], mb["x0"], block_size=BLOCK, doc_ids=mb["docs"], cp_layout=layout
    )
    output = model(*inputs)
    common = dict(
        ar_weight=AR_WEIGHT,
        token_shift=True,
        loss_mask=mb["loss_mask"],
        doc_ids=mb["docs"],
        mdm_denominator=denominators[0],
        ar_denominator=denominators[1],
    )

    def loss_func(logits):
        if layout is None:
            terms = nbdiff_loss(logits, mb["x0"], mb["masked"], mb["t"], **common)
        else:
            terms = cp_local_loss(logits, mb["x0"], mb["masked"], mb["t"], layout, **common)
        # clone: the schedule scales the returned loss in place (detach would share it)
        return terms.total, {"total": terms.total.detach().clone()}

    return output, loss_func


def run_schedule(model, layout) -> float | None:
    """Loss of the global batch (None off the last pipeline stage); leaves the reduced gradients."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = micro_batches()
    step = partial(forward_step, denominators=global_denominators(batches), layout=layout)
    model.zero_grad(set_to_none=True)
    with cuda_to_cpu():
        losses = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=BATCH // MICRO,
            # the FULL 2L: megatron divides it by the CP size for its p2p buffers itself
            seq_length=2 * L,
            micro_batch_size=MICRO,
            forward_only=False,
        )
    # What megatron's DDP + finalize_model_grads do: sum the CP shares (the schedule scaled the loss
    # by the CP size, DDP averages over DP x CP), and the TP-partial QK-norm weights.
    reduce_context_parallel_grads(model)
    reduce_tensor_parallel_replicated_grads(model)
    if not parallel_state.is_pipeline_last_stage():
        return None
    # Each micro-batch's total is its exact share of the global loss: sum them (and the CP shares).
    total = torch.stack([item["total"] for item in losses]).sum()
    if layout is not None:
        dist.all_reduce(total, group=parallel_state.get_context_parallel_group())
    return float(total)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["cp", "tpcp", "ppcp"], required=True)
    parser.add_argument("--out", type=Path, default=None, help="folder for result_<rank>.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = config()

    initialize_parallel(1, 1, 1, seed=5)
    reference = build_model(cfg, seed=5)
    full_state = {
        k: v.detach().clone()
        for k, v in reference.state_dict().items()
        if not k.endswith("_extra_state")
    }
    ref_loss = run_schedule(reference, None)
    ref_grads = {name: p.grad.detach().clone() for name, p in reference.named_parameters()}
    ref_rows = cfg.padded_vocab_size(1)
    probe = micro_batches()[0]
    probe_kwargs = dict(block_size=BLOCK, doc_ids=probe["docs"])
    with torch.no_grad():
        ref_logits = nbdiff_forward(reference, probe["xt"], probe["x0"], **probe_kwargs)
    del reference

    tp = 2 if args.mode == "tpcp" else 1
    pp = 2 if args.mode == "ppcp" else 1
    initialize_parallel(tp, pp, 2, seed=5)
    from megatron.core import parallel_state

    layout = ContextParallelLayout.current(L)
    model = build_model(cfg, seed=123)  # different init, then overwritten with the full weights
    load_full_state_dict(model, full_state)
    loss = run_schedule(model, layout)
    # Full layout: TP shards gathered, PP stages merged (tied embeddings summed); the CP ranks of a
    # stage hold identical gradients after the CP reduction.
    grads = full_gradients(model, cfg, ref_rows)
    logits_diff = None
    if args.mode != "ppcp":  # a lone forward needs the whole model on this rank
        with torch.no_grad():
            local = nbdiff_forward(
                model, probe["xt"], probe["x0"], cp_layout=layout, **probe_kwargs
            )
        logits_diff = (gather_cp_sequence(local, layout) - ref_logits).abs().max().item()

    result: dict = {
        "rank": dist.get_rank(),
        "mode": args.mode,
        "cp_rank": parallel_state.get_context_parallel_rank(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "local_tokens": layout.global_positions().tolist(),
        "loss": loss,
        "ref_loss": ref_loss,
        "loss_diff": None if loss is None else abs(loss - ref_loss),
    }
    missing = sorted(set(ref_grads) - set(grads))
    result["missing_grads"] = missing
    diffs = {k: (grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads if k in grads}
    result["max_grad_diff"] = max(diffs.values())
    result["worst_param"] = max(diffs, key=diffs.get)
    result["grad_scale"] = max(g.abs().max().item() for g in ref_grads.values())
    result["logits_diff"] = logits_diff
    result["ok"] = (
        not missing
        and result["max_grad_diff"] <= TOL
        and (logits_diff is None or logits_diff <= TOL)
        and (loss is None or result["loss_diff"] <= TOL)
    )
    print("RESULT " + json.dumps(result), flush=True)
    if args.out is not None:
        (args.out / f"result_{dist.get_rank()}.json").write_text(json.dumps(result))
    destroy_parallel()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
