"""One optimizer step k of a run (k = 1..train.steps, as logged; `method/curriculum.py` states it).

1. The config's step schedule (training/schedule.py) gives the block size B(k), the AR weight λ(k)
   and the learning rate: all functions of k only, so every rank agrees without communication.
2. This DP rank's micro-batches of the global batch, noised per sample, and the global loss
   denominators (training/batches.py).
3. megatron-core's `get_forward_backward_func` runs the x_t ⊕ x_0 forward and backward of all
   micro-batches (with pipeline parallelism when pp > 1) through `forward_step` and `loss_func`; DDP
   reduces the gradients over DP x CP. With context parallelism (cp > 1) each rank feeds its zigzag
   shard of x_t ⊕ x_0 (`model/context_parallel.py`) and computes the loss on its own logit rows
   (`cp_local_loss`), with targets from the full micro-batch; the CP ranks' losses sum to the
   micro-batch's.
4. The loss terms are reduced to the global batch's (`reduce_terms`, identical on every rank); a step
   whose loss or global gradient norm is not finite is not applied (`optimizer_step`), and the loop's
   guards count it (training/faults.py).

CPU and GPU run the same DDP, optimizer, clipping and precision code: megatron-core's distributed
optimizer (on gloo on CPU), its gradient clipping, bf16 or fp32.

The AR objective (`Components.objective == "ar"`) runs the same steps as a plain causal LM: the
forward is over the L tokens of x_0 with the causal mask, and the loss is L_AR alone (`nbdiff_loss`
scoring only the x_0 rows: the same targets, document boundaries and loss mask as the NBDiff step's
AR term).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func

from nbdiff_megatron import megatron_compat
from nbdiff_megatron.kernels import nbdiff_linear_loss
from nbdiff_megatron.method.losses import nbdiff_loss
from nbdiff_megatron.model.context_parallel import ContextParallelLayout, cp_local_loss
from nbdiff_megatron.training import faults
from nbdiff_megatron.training.batches import MicroBatch, global_denominators, micro_batches
from nbdiff_megatron.training.config import TrainConfig
from nbdiff_megatron.training.setup import Batch, Components

ForwardBackward = Callable[..., list[dict[str, torch.Tensor]]]
"""megatron-core's `get_forward_backward_func()`: the schedule of the micro-batches' passes."""


class StepOutcome(NamedTuple):
    """What one step gives back."""

    terms: torch.Tensor
    """[total, mdm, ar] of the global batch, identical on every rank."""
    grad_norm: float | None
    """The global gradient norm; None when the loss was not finite (the gradients were not read)."""
    block_size: int
    """B of the step: 1 for the AR objective (the B = 1, λ = 1 point of the curriculum)."""
    ar_weight: float
    """λ of the step: 1 for the AR objective."""


@dataclass(frozen=True)
class FusedLoss:
    """What the fused output projection + loss (`kernels.nbdiff_linear_loss`) takes from the layout."""

    tp_group: dist.ProcessGroup | None
    """The tensor-parallel group the vocabulary is sharded over (None at tp = 1)."""
    vocab_size: int
    sequence_parallel: bool
    project_padded: bool
    """loss.fused_padded_projection: project the padded shard width."""


@dataclass(frozen=True)
class LossSettings:
    """What `loss_func` needs beyond the micro-batch and the model output, fixed for one step."""

    fused: FusedLoss | None
    """The fused loss's layout (None: the reference loss on full logits)."""
    ar_weight: float
    token_shift: bool
    block_size: int
    cp_layout: ContextParallelLayout | None
    validate: bool
    denominators: tuple[torch.Tensor, torch.Tensor]
    """Loss tokens and AR targets of the global batch."""
    scale: float
    """Micro-batches x DP ranks: undoes megatron's division by them (see `loss_func`)."""
    poison: bool
    """The NBDIFF_FAULT_NAN_STEPS drill: the loss of this step is NaN."""


@dataclass
class TrainStep:
    """The step of a run: built once at set-up, called with k = 1, 2, ... (`__call__`)."""

    parts: Components
    batches: Iterator[Batch]
    """This DP rank's micro-batches from the data position of the start step on."""
    drills: faults.Drills
    forward_backward: ForwardBackward
    fused: FusedLoss | None
    """The fused loss's layout (None: the reference loss on full logits)."""

    @classmethod
    def build(cls, parts: Components, batches: Iterator[Batch], drills: faults.Drills) -> TrainStep:
        return cls(parts, batches, drills, get_forward_backward_func(), fused_loss(parts.cfg))

    def __call__(self, step: int) -> StepOutcome:
        """Forward, backward and (when loss and gradients are finite) the update of `step`."""
        parts = self.parts
        schedule = parts.cfg.step_schedule()
        block_size = schedule.block_size(step)
        set_lr(parts.optimizer, schedule.lr(step))
        parts.model.zero_grad_buffer()
        parts.optimizer.zero_grad()
        mbs = micro_batches(parts, self.batches, step, block_size)
        ar_only = parts.objective == "ar"
        settings = LossSettings(
            fused=self.fused,
            ar_weight=1.0 if ar_only else schedule.ar_weight(step),
            token_shift=parts.cfg.loss.token_shift,
            block_size=block_size,
            cp_layout=parts.cp_layout,
            validate=parts.cfg.loss.validate,
            denominators=global_denominators(parts, mbs),
            scale=float(len(mbs) * parts.place.dp),
            poison=step in self.drills.nan_loss_steps,
        )
        terms = reduce_terms(parts, self._forward_backward(mbs, settings))
        if step in self.drills.spike_steps:
            terms = terms * 10.0
        block = 1 if ar_only else block_size
        if not bool(torch.isfinite(terms).all()):
            return StepOutcome(terms, None, block, settings.ar_weight)
        if step in self.drills.nan_grad_steps:
            faults.poison_one_gradient(parts.model)
        grad_norm, _ = optimizer_step(parts)
        return StepOutcome(terms, grad_norm, block, settings.ar_weight)

    def _forward_backward(
        self, mbs: list[MicroBatch], settings: LossSettings
    ) -> list[dict[str, torch.Tensor]]:
        cfg = self.parts.cfg
        with megatron_compat.cuda_to_cpu():
            return self.forward_backward(
                forward_step_func=partial(forward_step, settings=settings),
                data_iterator=iter(mbs),
                model=[self.parts.model],
                num_microbatches=len(mbs),
                # The full 2L (megatron divides by cp itself); L for the AR objective's x_0 forward.
                seq_length=(1 if self.parts.objective == "ar" else 2) * cfg.seq_length(),
                micro_batch_size=cfg.train.micro_batch_size,
                forward_only=False,
            )


def forward_step(
    mbs_iter: Iterator[MicroBatch], model: DistributedDataParallel, *, settings: LossSettings
) -> tuple[torch.Tensor, Callable]:
    """megatron-core's forward-step contract: the output of the next micro-batch and its loss."""
    mb = next(mbs_iter)
    if settings.fused is None:
        return model(*mb.inputs), partial(loss_func, mb, weight=None, settings=settings)
    # Fused loss: the last stage returns hidden states; the loss projects only its loss rows.
    output = model(*mb.inputs, return_hidden=True)
    return output, partial(loss_func, mb, weight=output_weight(model), settings=settings)


def loss_func(
    mb: MicroBatch,
    output: torch.Tensor,
    *,
    weight: torch.Tensor | None,
    settings: LossSettings,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """megatron-core's loss contract: the micro-batch's share of the global loss, and [total, mdm,
    ar] to report."""
    s = settings
    common: dict[str, Any] = dict(
        ar_weight=s.ar_weight,
        token_shift=s.token_shift,
        loss_mask=mb.loss_mask,
        doc_ids=mb.doc_ids,
        mdm_denominator=s.denominators[0],
        ar_denominator=s.denominators[1],
        validate=s.validate,
    )
    if s.fused is not None:
        # `output` is the final-norm hidden state, `weight` this TP rank's vocabulary shard; under
        # CP the rows are this rank's, scored against the full micro-batch's targets.
        rows = mb.rows if s.cp_layout is None else s.cp_layout.global_positions(device=mb.x0.device)
        checks = dict(block_size=s.block_size, positions=mb.positions) if rows is None else {}
        fused = s.fused
        terms = nbdiff_linear_loss(
            output,
            weight,
            mb.x0,
            mb.masked,
            mb.t,
            rows=rows,
            tp_group=fused.tp_group,
            vocab_size=fused.vocab_size,
            sequence_parallel=fused.sequence_parallel,
            # d W goes straight into megatron DDP's fp32 main_grad, as megatron's gradient-
            # accumulation fusion does (and, like it, flags the weight so DDP's overlapped reduce
            # sees it ready).
            accumulate_into_main_grad=True,
            project_padded=fused.project_padded,
            **checks,
            **common,
        )
    elif s.cp_layout is None:
        # block_size and positions only feed the spec checks (a masked block start under shift).
        terms = nbdiff_loss(
            output,
            mb.x0,
            mb.masked,
            mb.t,
            block_size=s.block_size,
            positions=mb.positions,
            rows=mb.rows,
            **common,
        )
    else:
        # This CP rank's logit rows; the CP ranks' totals sum to the micro-batch's share.
        terms = cp_local_loss(output, mb.x0, mb.masked, mb.t, s.cp_layout, **common)
    total = terms.total
    if s.poison:  # NBDIFF_FAULT_NAN_STEPS drill: a real NaN through the loss and the gradients
        total = total * float("nan")
    # A copy (stack): megatron's schedule scales the returned loss in place (x cp / micro-batches).
    reported = torch.stack([total.detach(), terms.mdm.detach(), terms.ar.detach()]).float()
    # megatron divides by the number of micro-batches (and multiplies by the CP size) and DDP averages
    # over DP x CP ranks; the terms are already exact shares of the global loss, so undo the division
    # by micro-batches and DP ranks (the x cp and the average over CP ranks cancel).
    return total * s.scale, {"terms": reported}


def output_weight(model: torch.nn.Module) -> torch.Tensor | None:
    """This rank's shard of the output weight on the last pipeline stage (tied or not), else None."""
    inner = model
    while not hasattr(inner, "post_process") and hasattr(inner, "module"):
        inner = inner.module
    if not inner.post_process:
        return None
    if inner.share_embeddings_and_output_weights:
        return inner.shared_embedding_or_output_weight()
    return inner.output_layer.weight


def fused_loss(cfg: TrainConfig) -> FusedLoss | None:
    """The fused loss's layout on this rank (None with loss.fused off: the reference loss)."""
    if not cfg.loss.fused:
        return None
    tp = ps.get_tensor_model_parallel_world_size()
    return FusedLoss(
        tp_group=ps.get_tensor_model_parallel_group() if tp > 1 else None,
        vocab_size=cfg.model.vocab_size,
        sequence_parallel=cfg.parallel.sequence_parallel and tp > 1,
        project_padded=cfg.loss.fused_padded_projection,
    )


def reduce_terms(parts: Components, losses: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """[total, mdm, ar] of the global batch, identical on every rank."""
    terms = torch.zeros(3, dtype=torch.float32, device=parts.place.device)
    for item in losses:
        terms += item["terms"].to(parts.place.device)
    if dist.is_initialized():
        if parts.place.dp * parts.cfg.parallel.cp > 1:
            # The DP ranks hold other micro-batches, the CP ranks other rows of the same ones.
            group = ps.get_data_parallel_group(with_context_parallel=True)
            dist.all_reduce(terms, group=group)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            # Only the last stage computed the loss; the others hold zeros.
            dist.all_reduce(terms, group=ps.get_pipeline_model_parallel_group())
    return terms


def set_lr(optimizer: MegatronOptimizer, lr: float) -> None:
    """The learning rate of step k into every parameter group (with its lr_mult)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def optimizer_step(parts: Components) -> tuple[float, bool]:
    """Clip and step unless the global gradient norm is not finite; returns (grad norm, stepped).

    megatron-core's `optimizer.step()` checks for NaN/inf only with a loss scaler (fp16): in fp32 and
    bf16 it would apply a NaN gradient. So its steps are spelled out here -- prepare_grads, the global
    norm (all-reduced, identical on every rank), clip, step_with_ready_grads -- and the update is
    skipped on every rank alike when the norm is not finite.
    """
    opt = parts.optimizer
    if opt.prepare_grads():  # fp16 loss scaling found inf/nan (and lowered the scale)
        return float("inf"), False
    with megatron_compat.cuda_to_cpu():
        grad_norm = float(opt.get_grad_norm())
    if not math.isfinite(grad_norm):
        return grad_norm, False
    clip = parts.cfg.optimizer.clip_grad
    if clip > 0 and grad_norm > clip:
        clip_grads(opt, clip, grad_norm)
    return grad_norm, bool(opt.step_with_ready_grads())


def clip_grads(optimizer: MegatronOptimizer, max_norm: float, grad_norm: float) -> None:
    """Megatron's clipping with the global norm already computed (as ChainedOptimizer.step does)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = [] if getattr(opt, "is_stub_optimizer", False) else opt.get_parameters()
        if params:
            decoupled = getattr(opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False)
            # On a CPU: its type check names CUDA tensors, its overflow buffer is device='cuda'.
            with megatron_compat.megatron_optimizer_on_cpu():
                clip_grad_by_total_norm_fp32(
                    params, max_norm, grad_norm, use_decoupled_grad=decoupled
                )
