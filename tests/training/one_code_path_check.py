"""Run by test_one_code_path.py under torchrun (2 gloo ranks): the training step's DDP / optimizer
variants, one process launch for all of them.

For each variant (distributed optimizer on/off x overlapped grad reduce on/off x fp32/bf16, plus
the untied output layer with the fused loss and overlap, and overlap_param_gather) the model,
DDP wrapper and optimizer are rebuilt from the same seed (training/setup.py `build_components`)
and trained 2 steps with the run's own `TrainStep`. Recorded per step, before the optimizer step:
the loss terms and the DP-reduced gradient of every parameter (the distributed optimizer's
reduce-scattered buffer shards are all-gathered back, so every variant compares the full reduced
gradient) and that gradient's float64 norm, the oracle of the optimizer's reported norm; after the
last step the parameters. Rank 0 keeps each variant's reference in memory and writes the
differences to JSON:

    {variant: {"losses": [[total, mdm, ar] per step], "grad_norms": [...],
               "true_grad_norms": [float64 norm of the reduced gradient, per step],
               "grad_err": [max |g - g_ref| / max |g_ref|, per step], "param_err": ...,
               "reference": name}}

Both layouts run in the one launch (megatron's parallel state is re-initialised per variant): dp2 =
data parallel 2; tp2sp = tensor parallel 2 with sequence parallelism. OUT.json maps
"<layout>/<variant>" to the record above.

Usage: torchrun --nproc-per-node 2 tests/training/one_code_path_check.py PREFIX OUT.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import torch.distributed as dist

LAYOUTS = {
    "dp2": ["--parallel.dp=2"],
    "tp2sp": ["--parallel.tp=2", "--parallel.sequence_parallel=true"],
}
# Fixed B = 2 (both loss terms live), clipping active (the step's gradient norm is above 0.05). Adam's
# eps is 1e-3, not 1e-8: with 1e-8 the first Adam step is lr * sign(g), so a rounding-level gradient
# difference on a near-zero component moves that parameter by up to 2 lr, and the variants' parameters
# (and the second step's gradients) differed by whatever sign flips the machine's rounding gave (1e-4
# of the largest parameter, more with AVX-512). With 1e-3 the update is smooth in g near 0: parameters
# differ by their gradients' differences carried through Adam, and a wrong shard or reduce still moves
# them by O(lr).
COMMON = [
    "--curriculum.start_block_size=2",
    "--curriculum.target_block_size=2",
    "--train.steps=2",
    "--optimizer.clip_grad=0.05",
    "--optimizer.adam_eps=1e-3",
]


# At TP = 2 (DP = 1) the distributed optimizer and the overlapped reduce have one DP rank: the
# corner cases of the matrix run there, the full matrix at DP = 2.
TP_VARIANTS = (
    "plain-sync-fp32",
    "distopt-overlap-fp32",
    "plain-sync-bf16",
    "distopt-overlap-bf16",
    "untied-reference",
    "untied-fused-distopt-overlap",
)


def variants(layout: str = "dp2") -> dict[str, tuple[list[str], str]]:
    """name -> (overrides, the variant it is compared with)."""
    out: dict[str, tuple[list[str], str]] = {}
    for precision in ("fp32", "bf16"):  # fp32 first: the bf16 variants also compare with it
        reference = f"plain-sync-{precision}"
        for dist_opt in (False, True):
            for overlap in (False, True):
                name = f"{'distopt' if dist_opt else 'plain'}-{'overlap' if overlap else 'sync'}-{precision}"
                out[name] = (
                    [
                        f"--train.precision={precision}",
                        f"--parallel.distributed_optimizer={str(dist_opt).lower()}",
                        f"--parallel.overlap_grad_reduce={str(overlap).lower()}",
                    ],
                    reference,
                )
    # The untied output layer: the fused loss writes its main_grad directly; the reference loss
    # path (full logits, autograd) is the oracle.
    untied = ["--model.tie_embeddings=false", "--train.precision=fp32"]
    out["untied-reference"] = ([*untied, "--loss.fused=false"], "untied-reference")
    for overlap in (False, True):
        out[f"untied-fused-distopt-{'overlap' if overlap else 'sync'}"] = (
            [*untied, f"--parallel.overlap_grad_reduce={str(overlap).lower()}"],
            "untied-reference",
        )
    out["distopt-overlap-paramgather-fp32"] = (
        [
            "--train.precision=fp32",
            "--parallel.overlap_grad_reduce=true",
            "--parallel.overlap_param_gather=true",
        ],
        "plain-sync-fp32",
    )
    if layout == "tp2sp":
        out = {name: out[name] for name in TP_VARIANTS}
    return out


def reduced_grads(model: Any) -> dict[str, torch.Tensor]:
    """Every parameter's DP-reduced gradient (fp32 copies), whatever the optimizer."""
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    for group in model.bucket_groups:
        if not model.ddp_config.use_distributed_optimizer:
            continue
        comm = group.intra_distributed_optimizer_instance_group
        size, rank = comm.size(), comm.rank()
        for bucket in group.buckets:
            if size > 1:
                mine = shard_buffer(bucket.grad_data, size)[rank].clone()
                dist.all_gather_into_tensor(bucket.grad_data, mine, group=comm)
    return {
        name: p.main_grad.detach().float().clone()
        for name, p in model.module.named_parameters()
        if p.requires_grad
    }


def true_grad_norm(model: Any, grads: dict[str, torch.Tensor]) -> float:
    """The L2 norm of the whole reduced gradient in float64, every parameter counted once: the
    tensor-parallel shards summed over the TP group, a replicated parameter (a norm's weight, a
    TP = 1 weight) taken from this rank. What `optimizer.get_grad_norm()` should return."""
    from megatron.core import parallel_state

    sharded = torch.zeros(1, dtype=torch.float64)
    replicated = torch.zeros(1, dtype=torch.float64)
    for name, param in model.module.named_parameters():
        if name in grads:
            squares = grads[name].double().square().sum()
            if getattr(param, "tensor_model_parallel", False):
                sharded += squares
            else:
                replicated += squares
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(sharded, group=parallel_state.get_tensor_model_parallel_group())
    return float((sharded + replicated).sqrt())


def relative_error(mine: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """max |a - b| / max |b| over all tensors, maximised over the ranks (TP shards differ)."""
    diff = max(float((mine[k] - ref[k]).abs().max()) for k in ref)
    scale = max(float(ref[k].abs().max()) for k in ref)
    out = torch.tensor([diff / max(scale, 1e-30)], dtype=torch.float64)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return float(out)


def run_variant(prefix: str, layout: str, overrides: list[str]) -> dict[str, Any]:
    from nbdiff_megatron.training import faults
    from nbdiff_megatron.training import step as step_module
    from nbdiff_megatron.training.config import load_config
    from nbdiff_megatron.training.setup import build_components, data_iterator, finish_param_sync
    from nbdiff_megatron.training.step import TrainStep
    from tests.training.runs import TINY, tiny_overrides

    cfg = load_config(TINY, tiny_overrides(prefix, *COMMON, *LAYOUTS[layout], *overrides))
    parts = build_components(cfg, "nbdiff")
    batches = data_iterator(parts.cfg, parts.dataset, parts.place, consumed_samples=0)
    train_step = TrainStep.build(parts, batches, faults.NO_DRILLS)
    grads: list[dict[str, torch.Tensor]] = []
    true_norms: list[float] = []
    step_optimizer = step_module.optimizer_step

    def snapshot_then_step(parts: Any) -> tuple[float, bool]:
        grads.append(reduced_grads(parts.model))
        true_norms.append(true_grad_norm(parts.model, grads[-1]))
        return step_optimizer(parts)

    step_module.optimizer_step = snapshot_then_step
    try:
        record: dict[str, Any] = {"losses": [], "grad_norms": []}
        for step in range(1, cfg.train.steps + 1):
            outcome = train_step(step)
            record["losses"].append([float(x) for x in outcome.terms])
            record["grad_norms"].append(outcome.grad_norm)
    finally:
        step_module.optimizer_step = step_optimizer
    finish_param_sync(parts.model)
    record["grads"] = grads
    record["true_grad_norms"] = true_norms
    record["params"] = {
        name: p.detach().float().clone() for name, p in parts.model.module.named_parameters()
    }
    return record


def main(prefix: str, out: str) -> int:
    results: dict[str, Any] = {}
    for layout in LAYOUTS:
        results.update({f"{layout}/{k}": v for k, v in compare_variants(prefix, layout).items()})
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def compare_variants(prefix: str, layout: str) -> dict[str, Any]:
    """Every variant of `layout` against its reference (module docstring)."""
    results: dict[str, Any] = {}
    kept: dict[str, dict[str, Any]] = {}
    for name, (overrides, reference) in variants(layout).items():
        record = run_variant(prefix, layout, overrides)
        kept[name] = record
        ref = kept[reference]
        results[name] = {
            "reference": reference,
            "losses": record["losses"],
            "grad_norms": record["grad_norms"],
            "grad_err": [
                relative_error(g, r) for g, r in zip(record["grads"], ref["grads"], strict=True)
            ],
            "param_err": relative_error(record["params"], ref["params"]),
            "true_grad_norms": record["true_grad_norms"],
        }
        if name.endswith("-bf16"):  # and against the same variant in fp32
            fp32 = kept[name.replace("-bf16", "-fp32")]
            results[name]["fp32_grad_err"] = [
                relative_error(g, r) for g, r in zip(record["grads"], fp32["grads"], strict=True)
            ]
            results[name]["fp32_losses"] = fp32["losses"]
    return results


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
