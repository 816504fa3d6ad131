"""TP=2 / PP=2 vs 1 rank, through megatron-core's get_forward_backward_func (launched by torchrun).

Usage: python -m torch.distributed.run --nproc-per-node 2 tests/model/multirank_check.py --mode tp|pp

Every rank first runs the 1-rank reference (TP = PP = 1, the 2 ranks being data-parallel replicas of the
same computation), keeps its weights, loss and gradients, then rebuilds parallel_state with TP=2 or PP=2,
loads the same full weights into its shard, runs the same micro-batches and compares the loss and the
gradients gathered back into the full layout. Prints one `RESULT {json}` line per rank (and writes it to
`--out/result_<rank>.json`); exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import nbdiff_megatron  # noqa: E402

nbdiff_megatron.install_compat()  # as the `nbdiff` command does (docs/ARCHITECTURE.md)

from nbdiff_megatron.errors import ConfigError  # noqa: E402
from nbdiff_megatron.megatron_compat import cuda_to_cpu  # noqa: E402
from nbdiff_megatron.model.builder import build_model, nbdiff_model_inputs  # noqa: E402
from nbdiff_megatron.model.config import ModelConfig  # noqa: E402
from nbdiff_megatron.model.parallel import (  # noqa: E402
    destroy_parallel,
    full_key,
    gather_full_tensor,
    initialize_parallel,
    layer_offset_of,
    load_full_state_dict,
    reduce_tensor_parallel_replicated_grads,
)

L, BATCH, MICRO, VOCAB, BLOCK = 16, 4, 2, 100, 4
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
    gen = torch.Generator().manual_seed(99)
    x0 = torch.randint(0, VOCAB, (BATCH, L), generator=gen)
    xt = torch.where(torch.rand(BATCH, L, generator=gen) < 0.5, torch.full_like(x0, VOCAB - 1), x0)
    docs = torch.tensor(
        [[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 7, [0] * 16, [0] * 3 + [1] * 13]
    )
    return [
        {"x0": x0[i : i + MICRO], "xt": xt[i : i + MICRO], "docs": docs[i : i + MICRO]}
        for i in range(0, BATCH, MICRO)
    ]


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    inputs = nbdiff_model_inputs(batch["xt"], batch["x0"], block_size=BLOCK, doc_ids=batch["docs"])
    output = model(*inputs)
    targets = torch.cat([batch["x0"], batch["x0"]], dim=1)

    def loss_func(logits):
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        return loss, {"loss": loss.detach()}

    return output, loss_func


def run_schedule(model) -> float | None:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.zero_grad(set_to_none=True)
    with cuda_to_cpu():
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches()),
            model=[model],
            num_microbatches=BATCH // MICRO,
            seq_length=2 * L,
            micro_batch_size=MICRO,
            forward_only=False,
        )
    # What finalize_model_grads does under DDP: QK-norm weights see only this rank's heads.
    reduce_tensor_parallel_replicated_grads(model)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return float(sum(item["loss"] for item in losses) / len(losses))


def full_gradients(model, cfg: ModelConfig, full_rows: int) -> dict[str, torch.Tensor]:
    """This rank's gradients in the 1-rank layout, summed over pipeline stages (tied embeddings)."""
    from megatron.core import parallel_state

    offset = layer_offset_of(model)
    mine: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        rows = full_rows if "word_embeddings" in name or "output_layer" in name else None
        grad = gather_full_tensor(name, param.grad, param, gated_linear_unit=True, full_rows=rows)
        key = full_key(name, offset)
        if key == "output_layer.weight" and cfg.tie_embeddings:
            key = "embedding.word_embeddings.weight"
        mine[key] = mine.get(key, 0) + grad
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (parallel_state.get_pipeline_model_parallel_rank(), mine))
    merged: dict[str, torch.Tensor] = {}
    seen_stages = set()
    for stage, grads in gathered:
        if stage in seen_stages:  # a TP peer of a stage already counted: identical full gradients
            continue
        seen_stages.add(stage)
        for key, grad in grads.items():
            merged[key] = merged[key] + grad if key in merged else grad
    return merged


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["tp", "pp"], required=True)
    parser.add_argument("--out", type=Path, default=None, help="folder for result_<rank>.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = config()

    # 1-rank reference (each rank computes it identically).
    initialize_parallel(1, 1, 1, seed=5)
    reference = build_model(cfg, seed=5)
    full_state = {
        k: v.detach().clone()
        for k, v in reference.state_dict().items()
        if not k.endswith("_extra_state")
    }
    ref_loss = run_schedule(reference)
    ref_rows = cfg.padded_vocab_size(1)
    ref_grads = {}
    for name, param in reference.named_parameters():
        ref_grads[name] = param.grad.detach().clone()
    del reference

    tp, pp = (2, 1) if args.mode == "tp" else (1, 2)
    initialize_parallel(tp, pp, 1, seed=5)
    result: dict = {"rank": dist.get_rank(), "mode": args.mode}
    if args.mode == "tp":
        bad = ModelConfig(
            num_layers=2,
            hidden_size=48,
            ffn_hidden_size=128,
            num_attention_heads=3,
            vocab_size=VOCAB,
            seq_length=L,
        )
        try:
            build_model(bad)
            result["bad_heads_error"] = None
        except ConfigError as err:
            result["bad_heads_error"] = str(err)
    model = build_model(cfg, seed=123)  # different init, then overwritten with the full weights
    load_full_state_dict(model, full_state)
    result["local_qkv_shape"] = list(model.decoder.layers[0].self_attention.linear_qkv.weight.shape)
    result["local_layers"] = len(model.decoder.layers)
    loss = run_schedule(model)
    grads = full_gradients(model, cfg, ref_rows)

    result["loss"] = loss
    result["ref_loss"] = ref_loss
    if loss is not None:
        result["loss_diff"] = abs(loss - ref_loss)
    missing = sorted(set(ref_grads) - set(grads))
    result["missing_grads"] = missing
    diffs = {k: (grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads if k in grads}
    result["max_grad_diff"] = max(diffs.values())
    result["worst_param"] = max(diffs, key=diffs.get)
    result["grad_scale"] = max(g.abs().max().item() for g in ref_grads.values())
    ok = (
        not missing
        and result["max_grad_diff"] <= TOL
        and (loss is None or result["loss_diff"] <= TOL)
    )
    if args.mode == "tp":
        ok = (
            ok
            and bool(result["bad_heads_error"])
            and "model.num_attention_heads" in result["bad_heads_error"]
        )
    result["ok"] = ok
    print("RESULT " + json.dumps(result), flush=True)
    if args.out is not None:
        (args.out / f"result_{dist.get_rank()}.json").write_text(json.dumps(result))
    destroy_parallel()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
