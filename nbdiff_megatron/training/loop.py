"""The NBDiff training loop on megatron-core.

One optimizer step k (k = 1..train.steps, the number the logs, the metrics file and the checkpoint
iter_k show; `method/curriculum.py` states this convention):

1. The config's step schedule (`cfg.step_schedule()`, training/schedule.py) gives the block size B(k),
   the AR weight λ(k) and the learning rate: all functions of k only, so every rank agrees without
   communication.
2. Each data-parallel rank takes its micro-batches of the global batch from `data.loader`'s
   deterministic sampler, which starts at the consumed-samples count of the checkpoint (exact resume);
   the CP ranks of a DP rank get the same micro-batches.
3. For every sample, t and x_t are drawn on the CPU from generators seeded by (seed, k, the sample's
   index in the global batch) (`noise_micro_batch`): a resumed run replays the same noise, all TP/PP/CP
   ranks of a DP rank draw the same, and the same sample is noised alike at any DP size and micro-batch
   size (the run's loss curve does not depend on the layout).
4. The loss denominators (loss tokens, AR targets) are summed over micro-batches and DP ranks BEFORE the
   forward, so that each micro-batch's loss is its exact share of the global loss (method/losses.py).
5. megatron-core's `get_forward_backward_func` runs the x_t ⊕ x_0 forward and backward of all micro-
   batches (with pipeline parallelism when pp > 1), DDP reduces the gradients over DP x CP, the
   optimizer steps. With context parallelism (cp > 1) each rank feeds its zigzag shard of x_t ⊕ x_0
   (`model/context_parallel.py`) and computes the loss on its own logit rows (`cp_local_loss`), with
   targets from the full micro-batch; the CP ranks' losses sum to the micro-batch's.
   A step whose loss or global gradient norm is not finite is skipped (faults.py).

CPU and GPU run the same DDP, optimizer, clipping and precision code: megatron-core's distributed
optimizer (on gloo on CPU), its gradient clipping, bf16 or fp32 (`auto` is bf16 on GPU, fp32 on CPU;
bf16 on CPU is slow but valid). docs/GPU.md lists the branches that remain device-specific.

`train(cfg, objective="ar")` runs the same steps as a plain causal LM instead (the baseline of
benchmarks/train_step.py): the same model, optimizer, precision, DDP and batches, but the forward is
over the L tokens of x_0 with the causal mask, and the loss is L_AR alone (`nbdiff_loss` scoring only
the x_0 rows: same targets, document boundaries and loss mask as the NBDiff step's AR term).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from nbdiff_megatron.checkpoint.dist import AsyncWriter
from nbdiff_megatron.errors import CheckpointError, ConfigError, DataError
from nbdiff_megatron.training import checkpointing, cluster, faults, run_dir, run_lock
from nbdiff_megatron.training.config import TrainConfig, check_launch, dump_config
from nbdiff_megatron.training.logging import RunLogger, StepRecord, guess_peak_tflops


@dataclass
class TrainResult:
    """What `train` returns."""

    final_step: int
    """Optimizer steps completed (including those of the run it resumed)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One record per step run by THIS process (StepRecord fields)."""
    checkpoint: str | None = None
    """The last checkpoint written, if any."""
    stopped_by_signal: str | None = None
    """SIGTERM / SIGUSR1 when the run was preempted (a checkpoint was saved)."""
    skipped_steps: int = 0
    """Steps skipped because the loss or the gradient norm was not finite."""
    num_params: int = 0
    """Parameters of the whole model, counted once (the same at any parallel layout)."""
    already_complete: bool = False
    """The save directory held a COMPLETE marker for train.steps: nothing was run."""


OBJECTIVES = ("nbdiff", "ar")
"""What a training step optimises: the NBDiff loss on x_t ⊕ x_0, or next-token CE on x_0 alone."""


def check_objective(cfg: TrainConfig, objective: str) -> None:
    """Raise ConfigError when `objective` is unknown or cannot run with this config."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective={objective!r} is unknown: use one of {', '.join(OBJECTIVES)}")
    if objective == "nbdiff":
        return
    if cfg.parallel.cp > 1:
        raise ConfigError(
            f"the AR objective runs with parallel.cp=1 only (got {cfg.parallel.cp}): the context-"
            "parallel layout shards the 2L sequence of the NBDiff step"
        )
    ck = cfg.checkpoint
    if ck.save or ck.load:
        raise ConfigError(
            "the AR objective is a measurement baseline and neither saves nor loads checkpoints: "
            "set --checkpoint.save=null --checkpoint.load=null"
        )


NOISE_STREAM_SAMPLE = 0
"""`noise_seed` stream of a sample's own draws: its t (unless antithetic), token mask, annealed mask."""
NOISE_STREAM_PAIR_T = 1
"""`noise_seed` stream of the t of an antithetic pair (samples 2p and 2p + 1 of the global batch)."""


def noise_seed(seed: int, step: int, sample: int, stream: int = NOISE_STREAM_SAMPLE) -> int:
    """Seed of a noise generator: (train.seed, step k, the sample's index in the global batch, stream).

    Never the DP rank or micro-batch holding the sample: the same sample gets the same noise at any
    DP / TP / PP / CP size and micro-batch size (a requeue onto other nodes continues the same
    run). Stable across runs and platforms (numpy's SeedSequence).
    """
    state = np.random.SeedSequence([seed, step, sample, stream]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def first_sample_of(micro_batch: int, dp_rank: int, dp: int, micro_batch_size: int) -> int:
    """Index in the global batch of the first sample of a DP rank's micro-batch.

    The sampler (data/loader.py `DeterministicSampler`) deals each group of dp x micro_batch_size
    consecutive samples of the global order out in contiguous shares, rank r getting the r-th.
    """
    return (micro_batch * dp + dp_rank) * micro_batch_size


# ----------------------------------------------------------------------------------------- setup


@dataclass
class _Runtime:
    cfg: TrainConfig
    device: torch.device
    dp: int
    dp_rank: int
    rank: int
    world: int
    model: Any
    optimizer: Any
    dataset: Any
    mask_id: int
    tokenizer: Any
    num_params: int
    cp_layout: Any = None
    """ContextParallelLayout of this rank when cp > 1, else None."""
    batches: Iterator[dict[str, torch.Tensor]] | None = None
    """This DP rank's micro-batches (CPU tensors), from the data position of the start step."""
    consumed_at_start: int = 0
    start_step: int = 0
    loaded_state: dict[str, Any] = field(default_factory=dict)
    """The train_state of the checkpoint this run started from (empty for a fresh start)."""
    health: Any = None
    """The SpikeGuard, whose moving averages are saved with every checkpoint."""
    objective: str = "nbdiff"
    """One of OBJECTIVES: "ar" trains the same model as a plain causal LM on x_0."""
    run_identity: dict[str, Any] = field(default_factory=dict)
    """What every checkpoint states about the run (training/run_identity.py)."""
    writer: Any = None
    """checkpoint.async_save: the background checkpoint writer (checkpoint.dist.AsyncWriter)."""


def _resolve_precision(cfg: TrainConfig) -> str:
    """train.precision, with `auto` = bf16 on a GPU and fp32 on a CPU (bf16 runs on both)."""
    precision = cfg.train.precision
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return precision


def _init_distributed(cfg: TrainConfig) -> tuple[int, int]:
    """Start torch.distributed + megatron parallel_state; returns (world size, dp)."""
    from nbdiff_megatron.model.parallel import initialize_parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = check_launch(cfg, world, torch.cuda.is_available())
    par = cfg.parallel
    initialize_parallel(
        par.tp, par.pp, par.cp, seed=cfg.train.seed, timeout_minutes=par.nccl_timeout_minutes
    )
    return world, dp


def _load_tokenizer(cfg: TrainConfig) -> Any:
    from nbdiff_megatron.data.tokenizer import load_tokenizer

    return load_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)


def _model_config(cfg: TrainConfig, tokenizer: Any, precision: str) -> Any:
    model_cfg = cfg.model
    vocab = int(tokenizer.vocab_size)
    if model_cfg.vocab_size == 0:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab)
    elif model_cfg.vocab_size < vocab:
        raise ConfigError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {vocab} tokens "
            f"([MASK] included); set --model.vocab_size={vocab} or 0 (= from the tokenizer)"
        )
    return dataclasses.replace(model_cfg, params_dtype=precision)


def _wrap_ddp(model: torch.nn.Module, cfg: TrainConfig) -> Any:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from nbdiff_megatron import megatron_compat

    par = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather,
        use_distributed_optimizer=par.distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    with megatron_compat.cuda_to_cpu():
        wrapped = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    wrapped.config.finalize_model_grads_func = finalize_model_grads
    wrapped.config.no_sync_func = wrapped.no_sync
    return wrapped


def _build_optimizer(model: Any, cfg: TrainConfig, precision: str) -> Any:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from nbdiff_megatron import megatron_compat

    opt = cfg.optimizer
    ocfg = OptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=precision == "bf16",
        params_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )
    # On a CPU: FP32Optimizer.__init__ makes a device='cuda' tensor, and the distributed and bf16
    # optimizers sort parameters by CUDA type names.
    with megatron_compat.megatron_optimizer_on_cpu():
        optimizer = get_megatron_optimizer(ocfg, [model])
    model.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def _finish_param_sync(model: Any) -> None:
    """With overlap_param_gather, the parameters a DP rank does not own are all-gathered lazily, in
    the next forward's pre-hooks: complete that gather now (before a checkpoint reads the weights),
    as Megatron-LM does before it saves. No-op without it."""
    if getattr(model, "use_forward_hook", False):
        model.start_param_sync(force_sync=True)


def _build_dataset(cfg: TrainConfig, tokenizer: Any) -> Any:
    from nbdiff_megatron.data.config import parse_blend
    from nbdiff_megatron.data.datasets import build_datasets

    train_samples = cfg.train.steps * cfg.train.global_batch_size
    weighted = cfg.data.mode == "pretrain" and parse_blend(cfg.data.data_path)[1] is not None
    extra = cfg.train.global_batch_size if weighted else None
    datasets = build_datasets(
        cfg.data, cfg.seq_length(), tokenizer, (train_samples, extra, extra), seed=cfg.data.seed
    )
    train_set = datasets[0]
    if train_set is None or len(train_set) == 0:
        raise DataError(
            "the training split is empty: check data.data_path and data.split (the first weight "
            "must be > 0)"
        )
    return train_set


def _data_iterator(rt: _Runtime) -> Iterator[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches from the samples consumed before this run on, forever.

    The sampler wraps around the dataset (an SFT set smaller than the run is repeated, in order); the
    GPT datasets are built with as many samples as the run needs.
    """
    from nbdiff_megatron.data.loader import build_dataloader

    loop = rt.cfg.train
    loader = build_dataloader(
        rt.dataset,
        loop.micro_batch_size,
        consumed_samples=rt.consumed_at_start,
        data_parallel_rank=rt.dp_rank,
        data_parallel_size=rt.dp,
        num_workers=rt.cfg.data.num_workers,
        cyclic=True,
    )
    return iter(loader)


def _count_params(model: Any) -> int:
    """Parameters of the whole model (all TP/PP shards), counted once: the same at any layout.

    Summed over the TP x PP ranks; TP-replicated parameters (norms) count on TP rank 0 only, and a
    tied output layer -- a copy of the word embeddings that megatron-core keeps on the last pipeline
    stage when pp > 1 (`shared_embedding`) -- counts once, with the embeddings of the first stage.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    first_stage = ps.is_pipeline_first_stage(ignore_virtual=True)
    local = 0
    for p in model.parameters():
        if getattr(p, "shared_embedding", False) and not first_stage:
            continue
        if ps.get_tensor_model_parallel_rank() == 0 or param_is_not_tensor_parallel_duplicate(p):
            local += p.numel()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # NCCL reduces device tensors only
    count = torch.tensor([float(local)], device=device)
    if dist.is_initialized():
        dist.all_reduce(count, group=ps.get_model_parallel_group())
    return int(count.item())


# --------------------------------------------------------------------------------------- batches


class Noise(NamedTuple):
    """The noised view of one micro-batch (all CPU tensors, [b, L])."""

    x_t: torch.Tensor
    """Token ids with the masked positions replaced by [MASK]."""
    masked: torch.Tensor
    """True where x_t holds [MASK]."""
    t: torch.Tensor
    """Per-token masking probability: the L_MDM weight of a masked token is 1 / t. It is the diffusion
    time t of the token's block (or sequence) under uniform masking and the position-dependent
    probability p_q otherwise (an unbiased eq. 5); where a token cannot be masked (p = 0: a block start
    under token shift) it holds its block's t, never read by the loss."""
    positions: torch.Tensor
    """Each token's position inside its document (blocks are counted from document starts)."""
    annealed_draw: torch.Tensor | None = None
    """mask_kind annealed: the mask's random decisions [b, L, B] (`method.masks.annealed_draw`)."""


def noise_micro_batch(
    cfg: TrainConfig,
    x0: torch.Tensor,
    doc_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    step: int,
    first_sample: int,
    block_size: int,
    mask_id: int,
) -> Noise:
    """t and x_t of one micro-batch (docs/METHOD.md §4), drawn on the CPU, sample by sample.

    Row i is the sample of index `first_sample + i` in the global batch (`first_sample_of`); its noise
    comes from generators seeded by (train.seed, step, that index) only (`noise_seed`), so a sample is
    noised alike whatever DP rank and micro-batch hold it -- the same config gives the same run at any
    layout and micro-batch size -- every TP/PP/CP rank draws the same, and a resumed run replays it;
    CPU draws make a GPU run's noise reproducible on a CPU. A per-block t is drawn for the row's own
    blocks, so a row's draws do not depend on the other rows of its micro-batch either.

    Tokens outside the loss (loss_mask False) are never masked: in SFT these are the prompt and user
    turns, which inference always sees clean, so each x_t block sees what the active block sees at
    decoding time (docs/METHOD.md §3); in pretraining they are the padding suffix, which carries no loss and
    stays clean too (a [MASK] there would only be noise in the x_t context of no loss token). The random
    draws are made for every position first, so the noise of the loss tokens does not depend on it.
    """
    from nbdiff_megatron.method.masks import annealed_draw, training_position_ids
    from nbdiff_megatron.method.noise import block_layout, mask_tokens, mask_uniforms, per_token_t

    x0, doc_ids, loss_mask = x0.cpu(), doc_ids.cpu(), loss_mask.cpu()
    batch, length = x0.shape
    positions = training_position_ids(length, doc_ids)[:, :length]
    progress = cfg.step_schedule().anneal_progress(step)
    # A per-block t has one column per block of the row itself (a function of the sample alone).
    blocks = (
        block_layout(batch, length, block_size=block_size, positions=positions).index[:, -1] + 1
    )
    # Only the draws are made row by row (each sample's generator: t, then the token mask's uniforms,
    # then the annealed mask); the rest is computed for the whole micro-batch at once.
    t_rows, uniform_rows, draw_rows = [], [], []
    for row in range(batch):
        sample = first_sample + row
        gen = torch.Generator(device="cpu")
        gen.manual_seed(noise_seed(cfg.train.seed, step, sample))
        n_blocks = int(blocks[row]) if cfg.noise.per_block else None
        t_rows.append(_sample_t_of(cfg, step, sample, n_blocks, length, gen))
        uniform_rows.append(mask_uniforms(1, length, generator=gen))
        if progress is not None:
            draw_rows.append(annealed_draw(1, length, block_size, progress, generator=gen))
    t = _stack_t(t_rows, cfg.noise.t_max)
    _, masked, probability = mask_tokens(
        x0,
        t,
        block_size=block_size,
        mask_id=mask_id,
        position_dependent=cfg.noise.position_dependent,
        skew=cfg.noise.skew,
        token_shift=cfg.loss.token_shift,
        positions=positions,
        return_probability=True,
        uniforms=torch.cat(uniform_rows),
    )
    masked = masked & loss_mask
    x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    t_token = per_token_t(t, seq_len=length, block_size=block_size, positions=positions)
    # Weight each masked token by 1 / its own masking probability: E[masked / p] = 1 at every position,
    # so position-dependent masking keeps L_MDM an unbiased bound (1 / t would not).
    t_token = torch.where(probability > 0, probability.to(t_token.dtype), t_token)
    draw = torch.cat(draw_rows) if draw_rows else None
    return Noise(x_t, masked, t_token, positions, draw)


def _sample_t_of(
    cfg: TrainConfig,
    step: int,
    sample: int,
    n_blocks: int | None,
    length: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """t of one sample ([1], or [1, n_blocks] per block) from its generator `gen`.

    With `noise.antithetic` the samples 2p and 2p + 1 of the global batch are a mirrored pair: both
    take their t from the pair's own generator (`NOISE_STREAM_PAIR_T`), the odd one mirrored
    (`sample_t`'s antithetic rows), whatever ranks and micro-batches hold them. Per block, the pair
    draws `length` blocks (the most a row holds) and each keeps its first n_blocks: block j of one
    mirrors block j of the other even when their documents cut them into different numbers.
    """
    from nbdiff_megatron.method.noise import sample_t

    noise = cfg.noise
    if not noise.antithetic:
        return sample_t(1, n_blocks=n_blocks, lo=noise.t_min, hi=noise.t_max, generator=gen)
    pair = torch.Generator(device="cpu")
    pair.manual_seed(noise_seed(cfg.train.seed, step, sample - sample % 2, NOISE_STREAM_PAIR_T))
    width = None if n_blocks is None else length
    both = sample_t(
        2, n_blocks=width, lo=noise.t_min, hi=noise.t_max, antithetic=True, generator=pair
    )
    mine = both[sample % 2 : sample % 2 + 1]
    return mine if n_blocks is None else mine[:, :n_blocks]


def _stack_t(rows: list[torch.Tensor], filler: float) -> torch.Tensor:
    """The rows' t as one [b] or [b, n_blocks] tensor: a row with fewer blocks than the widest is
    padded with `filler` (columns past its last block, which no token reads)."""
    if rows[0].dim() == 1:
        return torch.cat(rows)
    width = max(row.shape[1] for row in rows)
    return torch.cat(
        [torch.nn.functional.pad(row, (0, width - row.shape[1]), value=filler) for row in rows]
    )


@dataclass
class _MicroBatch:
    """One micro-batch: the FULL [b, L] tensors (also under CP: loss targets cross CP chunks)."""

    x0: torch.Tensor
    masked: torch.Tensor
    t: torch.Tensor
    doc_ids: torch.Tensor
    loss_mask: torch.Tensor
    positions: torch.Tensor
    inputs: Any
    """ModelInputs of the forward (this CP rank's shard when cp > 1)."""
    rows: torch.Tensor | None = None
    """Positions in the x_t ⊕ x_0 layout (0..2L-1) of the forward's output rows when it covers only
    some of them: L..2L-1 for the AR objective (an x_0-only forward). None: all 2L (or the CP
    layout's)."""


def _micro_batch(
    rt: _Runtime, batch: dict[str, torch.Tensor], step: int, mb: int, block_size: int
) -> _MicroBatch:
    from nbdiff_megatron.model.builder import nbdiff_model_inputs

    cfg = rt.cfg
    if rt.objective == "ar":
        return _ar_micro_batch(rt, batch)
    noise = noise_micro_batch(
        cfg,
        batch["tokens"],
        batch["doc_ids"],
        batch["loss_mask"],
        step=step,
        first_sample=first_sample_of(mb, rt.dp_rank, rt.dp, cfg.train.micro_batch_size),
        block_size=block_size,
        mask_id=rt.mask_id,
    )
    x0, doc_ids, loss_mask = (batch[k].to(rt.device) for k in ("tokens", "doc_ids", "loss_mask"))
    # Multi-turn SFT samples carry turn ids (data/sft.py): no token sees past the end of its turn.
    turn_ids = batch["turn_ids"].to(rt.device) if "turn_ids" in batch else None
    x_t, masked, t, positions = (v.to(rt.device) for v in noise[:4])
    inputs = nbdiff_model_inputs(
        x_t,
        x0,
        block_size=block_size,
        kind=cfg.curriculum.mask_kind,
        doc_ids=doc_ids,
        backend=cfg.model.resolved_attention_backend(),
        cp_layout=rt.cp_layout,
        turn_ids=turn_ids,
        annealed_draw=noise.annealed_draw,
    )
    return _MicroBatch(x0, masked, t, doc_ids, loss_mask, positions, inputs)


def _ar_micro_batch(rt: _Runtime, batch: dict[str, torch.Tensor]) -> _MicroBatch:
    """A micro-batch of the AR objective: a causal forward on x_0, scored as the x_0 rows of the
    x_t ⊕ x_0 layout (nothing masked), so the loss is exactly the NBDiff step's L_AR term."""
    from nbdiff_megatron.method.masks import document_positions
    from nbdiff_megatron.model.builder import ar_model_inputs

    x0, doc_ids, loss_mask = (batch[k].to(rt.device) for k in ("tokens", "doc_ids", "loss_mask"))
    length = x0.shape[1]
    inputs = ar_model_inputs(x0, doc_ids=doc_ids, backend=rt.cfg.model.resolved_attention_backend())
    return _MicroBatch(
        x0,
        torch.zeros_like(x0, dtype=torch.bool),
        torch.ones(x0.shape, dtype=torch.float32, device=rt.device),
        doc_ids,
        loss_mask,
        document_positions(doc_ids.long()),
        inputs,
        rows=torch.arange(length, 2 * length, device=rt.device),
    )


def _micro_batches(rt: _Runtime, step: int, block_size: int) -> list[_MicroBatch]:
    """This DP rank's micro-batches of `step` (the CP ranks of a DP rank get the same ones)."""
    loop = rt.cfg.train
    count = loop.global_batch_size // rt.dp // loop.micro_batch_size
    return [_micro_batch(rt, next(rt.batches), step, mb, block_size) for mb in range(count)]


def _global_denominators(rt: _Runtime, mbs: list[_MicroBatch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss tokens and AR targets of the global batch: full micro-batches, summed over DP ranks only
    (the CP ranks of a DP rank hold the same micro-batches)."""
    from megatron.core import parallel_state as ps

    from nbdiff_megatron.method.losses import loss_token_counts

    totals = torch.zeros(2, dtype=torch.float64, device=rt.device)
    for mb in mbs:
        mdm, ar = loss_token_counts(mb.x0, loss_mask=mb.loss_mask, doc_ids=mb.doc_ids)
        totals[0] += mdm
        totals[1] += ar
    if dist.is_initialized() and rt.dp > 1:
        dist.all_reduce(totals, group=ps.get_data_parallel_group())
    return totals[0].float(), totals[1].float()


# ------------------------------------------------------------------------------------------ step


def _loss_func(
    mb: _MicroBatch,
    output: torch.Tensor,
    *,
    weight: torch.Tensor | None,
    fused: dict[str, Any] | None,
    ar_weight: float,
    token_shift: bool,
    block_size: int,
    cp_layout: Any,
    validate: bool,
    denominators: tuple[torch.Tensor, torch.Tensor],
    scale: float,
    poison: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from nbdiff_megatron.method.losses import nbdiff_loss
    from nbdiff_megatron.model.context_parallel import cp_local_loss

    common: dict[str, Any] = dict(
        ar_weight=ar_weight,
        token_shift=token_shift,
        loss_mask=mb.loss_mask,
        doc_ids=mb.doc_ids,
        mdm_denominator=denominators[0],
        ar_denominator=denominators[1],
        validate=validate,
    )
    if fused is not None:
        # `output` is the final-norm hidden state, `weight` this TP rank's vocabulary shard; under
        # CP the rows are this rank's, scored against the full micro-batch's targets.
        from nbdiff_megatron.kernels import nbdiff_linear_loss

        rows = mb.rows if cp_layout is None else cp_layout.global_positions(device=mb.x0.device)
        checks = dict(block_size=block_size, positions=mb.positions) if rows is None else {}
        terms = nbdiff_linear_loss(
            output, weight, mb.x0, mb.masked, mb.t, rows=rows, **fused, **checks, **common
        )
    elif cp_layout is None:
        # block_size and positions only feed the spec checks (a masked block start under shift).
        terms = nbdiff_loss(
            output,
            mb.x0,
            mb.masked,
            mb.t,
            block_size=block_size,
            positions=mb.positions,
            rows=mb.rows,
            **common,
        )
    else:
        # This CP rank's logit rows; the CP ranks' totals sum to the micro-batch's share.
        terms = cp_local_loss(output, mb.x0, mb.masked, mb.t, cp_layout, **common)
    total = terms.total
    if poison:  # NBDIFF_FAULT_NAN_STEPS drill: a real NaN through the loss and the gradients
        total = total * float("nan")
    # A copy (stack): megatron's schedule scales the returned loss in place (x cp / micro-batches).
    reported = torch.stack([total.detach(), terms.mdm.detach(), terms.ar.detach()]).float()
    # megatron divides by the number of micro-batches (and multiplies by the CP size) and DDP averages
    # over DP x CP ranks; the terms are already exact shares of the global loss, so undo the division
    # by micro-batches and DP ranks (the x cp and the average over CP ranks cancel).
    return total * scale, {"terms": reported}


def _output_weight(model: Any) -> torch.Tensor | None:
    """This rank's shard of the output weight on the last pipeline stage (tied or not), else None."""
    inner = model
    while not hasattr(inner, "post_process") and hasattr(inner, "module"):
        inner = inner.module
    if not inner.post_process:
        return None
    if inner.share_embeddings_and_output_weights:
        return inner.shared_embedding_or_output_weight()
    return inner.output_layer.weight


def _forward_step(
    mbs_iter: Iterator[_MicroBatch], model: Any, *, loss_kwargs: dict[str, Any]
) -> tuple[torch.Tensor, Callable]:
    mb = next(mbs_iter)
    if loss_kwargs["fused"] is None:
        return model(*mb.inputs), partial(_loss_func, mb, weight=None, **loss_kwargs)
    # Fused loss: the last stage returns hidden states; the loss projects only its loss rows.
    output = model(*mb.inputs, return_hidden=True)
    return output, partial(_loss_func, mb, weight=_output_weight(model), **loss_kwargs)


def _fused_loss_kwargs(cfg: TrainConfig) -> dict[str, Any] | None:
    """Arguments of nbdiff_linear_loss that come from the layout (None: the reference loss)."""
    if not cfg.loss.fused:
        return None
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    return dict(
        tp_group=ps.get_tensor_model_parallel_group() if tp > 1 else None,
        vocab_size=cfg.model.vocab_size,
        sequence_parallel=cfg.parallel.sequence_parallel and tp > 1,
        # d W goes straight into megatron DDP's fp32 main_grad, as megatron's gradient-accumulation
        # fusion does (and, like it, flags the weight so DDP's overlapped reduce sees it ready).
        accumulate_into_main_grad=True,
        project_padded=cfg.loss.fused_padded_projection,
    )


def _reduce_terms(rt: _Runtime, losses: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """[total, mdm, ar] of the global batch, identical on every rank."""
    from megatron.core import parallel_state as ps

    terms = torch.zeros(3, dtype=torch.float32, device=rt.device)
    for item in losses:
        terms += item["terms"].to(rt.device)
    if dist.is_initialized():
        if rt.dp * rt.cfg.parallel.cp > 1:
            # The DP ranks hold other micro-batches, the CP ranks other rows of the same ones.
            group = ps.get_data_parallel_group(with_context_parallel=True)
            dist.all_reduce(terms, group=group)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            # Only the last stage computed the loss; the others hold zeros.
            dist.all_reduce(terms, group=ps.get_pipeline_model_parallel_group())
    return terms


def _clip_grads(optimizer: Any, max_norm: float, grad_norm: float) -> None:
    """Megatron's clipping with the global norm already computed (as ChainedOptimizer.step does)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    from nbdiff_megatron import megatron_compat

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = [] if getattr(opt, "is_stub_optimizer", False) else opt.get_parameters()
        if params:
            decoupled = getattr(opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False)
            # On a CPU: its type check names CUDA tensors, its overflow buffer is device='cuda'.
            with megatron_compat.megatron_optimizer_on_cpu():
                clip_grad_by_total_norm_fp32(
                    params, max_norm, grad_norm, use_decoupled_grad=decoupled
                )


def _set_lr(optimizer: Any, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def _optimizer_step(rt: _Runtime) -> tuple[float, bool]:
    """Clip and step unless the global gradient norm is not finite; returns (grad norm, stepped).

    megatron-core's `optimizer.step()` checks for NaN/inf only with a loss scaler (fp16): in fp32 and
    bf16 it would apply a NaN gradient. So its steps are spelled out here -- prepare_grads, the global
    norm (all-reduced, identical on every rank), clip, step_with_ready_grads -- and the update is
    skipped on every rank alike when the norm is not finite.
    """
    from nbdiff_megatron import megatron_compat

    opt = rt.optimizer
    if opt.prepare_grads():  # fp16 loss scaling found inf/nan (and lowered the scale)
        return float("inf"), False
    with megatron_compat.cuda_to_cpu():
        grad_norm = float(opt.get_grad_norm())
    if not math.isfinite(grad_norm):
        return grad_norm, False
    clip = rt.cfg.optimizer.clip_grad
    if clip > 0 and grad_norm > clip:
        _clip_grads(opt, clip, grad_norm)
    return grad_norm, bool(opt.step_with_ready_grads())


def _train_step(rt: _Runtime, step: int, fwd_bwd: Callable) -> tuple[torch.Tensor, float | None]:
    """Forward, backward and (when loss and gradients are finite) the update of `step`.

    Returns the global [total, mdm, ar] and the gradient norm (None when the loss was not finite: the
    gradients are not even looked at).
    """
    from nbdiff_megatron import megatron_compat

    cfg = rt.cfg
    ar_only = rt.objective == "ar"
    schedule = cfg.step_schedule()
    block_size = schedule.block_size(step)
    _set_lr(rt.optimizer, schedule.lr(step))
    rt.model.zero_grad_buffer()
    rt.optimizer.zero_grad()
    mbs = _micro_batches(rt, step, block_size)
    loss_kwargs = dict(
        fused=_fused_loss_kwargs(cfg),
        ar_weight=1.0 if ar_only else schedule.ar_weight(step),
        token_shift=cfg.loss.token_shift,
        block_size=block_size,
        cp_layout=rt.cp_layout,
        validate=cfg.loss.validate,
        denominators=_global_denominators(rt, mbs),
        scale=float(len(mbs) * rt.dp),
        poison=step in faults.nan_drill_steps(),
    )
    with megatron_compat.cuda_to_cpu():
        losses = fwd_bwd(
            forward_step_func=partial(_forward_step, loss_kwargs=loss_kwargs),
            data_iterator=iter(mbs),
            model=[rt.model],
            num_microbatches=len(mbs),
            # The full 2L (megatron divides by cp itself); L for the AR objective's x_0 forward.
            seq_length=(1 if ar_only else 2) * cfg.seq_length(),
            micro_batch_size=cfg.train.micro_batch_size,
            forward_only=False,
        )
    terms = _reduce_terms(rt, losses)
    if step in faults.spike_drill_steps():
        terms = terms * 10.0
    if not bool(torch.isfinite(terms).all()):
        return terms, None
    if step in faults.nan_grad_drill_steps():
        faults.poison_one_gradient(rt.model)
    grad_norm, _ = _optimizer_step(rt)
    return terms, grad_norm


# ------------------------------------------------------------------------------------------ train


def _paths(cfg: TrainConfig) -> tuple[str | None, str | None]:
    save = cfg.checkpoint.save
    metrics = cfg.logging.metrics_file or (str(Path(save) / "metrics.jsonl") if save else None)
    tb = cfg.logging.tensorboard_dir or (str(Path(save) / "tensorboard") if save else None)
    return metrics, tb


def keep_aside(path: str | Path) -> Path | None:
    """Rename a non-empty file to `<stem>.before-<UTC time><suffix>` so a new start cannot clobber it.

    Returns the new name, or None when there was nothing to keep.
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = path.with_name(f"{path.stem}.before-{stamp}{path.suffix}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.stem}.before-{stamp}-{n}{path.suffix}")
    os.replace(path, target)
    return target


def train(
    cfg: TrainConfig,
    *,
    label: str = "train",
    resume_command: str | None = None,
    objective: str = "nbdiff",
) -> TrainResult:
    """Run (or resume) training as configured; all ranks call it. Returns a TrainResult.

    How the run starts follows the one resume rule (`checkpointing.plan_start`): a save directory
    that holds this run's checkpoints is continued, whatever checkpoint.load / finetune say.
    `resume_command` is the command line that started the run (printed when a signal stops it: the
    same command continues the run). `objective="ar"` trains the same model as a plain causal LM on
    x_0 (module docstring; `check_objective` says what it runs with). Rank 0 holds the save
    directory's run lock (training/run_lock.py) from before anything is written until the end.
    """
    check_objective(cfg, objective)
    lock, lock_note = _lock_save_dir(cfg.checkpoint.save)
    try:
        return _train(
            cfg,
            label=label,
            resume_command=resume_command,
            objective=objective,
            notes=[lock_note] if lock_note else [],
        )
    finally:
        if lock is not None:
            lock.release()


def _lock_save_dir(save: str | None) -> tuple[run_lock.RunLock | None, str | None]:
    """Rank 0: check that `save` can hold checkpoints and take its run lock (one writer per save
    directory). A refusal on rank 0 ends the other ranks too (torchrun stops the group)."""
    if not save or os.environ.get("RANK", "0") != "0":
        return None, None
    checkpointing.check_save_location(save)
    return run_lock.acquire(save)


def _prepare_start(cfg: TrainConfig, rank: int, notes: list[str]) -> checkpointing.StartPlan:
    """Rank 0 tidies the save directory (stale saves, an explicit older checkpoint, damaged newest
    ones: `checkpointing.prepare_save_dir`), then every rank plans the start (the resume rule)."""
    ck = cfg.checkpoint
    failure: BaseException | None = None
    if rank == 0:
        try:
            notes.extend(checkpointing.prepare_save_dir(ck.save, ck.load))
        except CheckpointError as exc:
            failure = exc
    if faults.any_rank_true(failure is not None):
        raise failure or CheckpointError(
            f"rank 0 could not prepare checkpoint.save={ck.save} (its log says why)"
        )
    return checkpointing.plan_start(ck.save, ck.load, ck.finetune)


def _train(
    cfg: TrainConfig,
    *,
    label: str,
    resume_command: str | None,
    objective: str,
    notes: list[str],
) -> TrainResult:
    """`train` with the run lock held."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nbdiff_megatron.model.builder import build_model
    from nbdiff_megatron.model.context_parallel import ContextParallelLayout
    from nbdiff_megatron.training.plan import step_flops
    from nbdiff_megatron.training.run_identity import run_identity

    cfg = run_dir.with_absolute_paths(cfg)  # the run's records work from any directory
    done_marker = checkpointing.read_completion_marker(cfg.checkpoint.save)
    if done_marker is not None and done_marker["step"] >= cfg.train.steps:
        # Resume rule 4: a requeued job or a re-run pipeline step of a finished run does nothing.
        if os.environ.get("RANK", "0") == "0":
            print(
                f"nbdiff train: {cfg.checkpoint.save} is already complete (step "
                f"{done_marker['step']} of train.steps={cfg.train.steps}, "
                f"{checkpointing.COMPLETE_FILE} marker); nothing to do. Raise --train.steps to "
                "train further.",
                flush=True,
            )
        return TrainResult(final_step=done_marker["step"], already_complete=True)
    on_cuda = torch.cuda.is_available()
    world, dp = _init_distributed(cfg)  # checks the launch first: all its problems at once
    precision = _resolve_precision(cfg)
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")

    tokenizer = _load_tokenizer(cfg)
    model_cfg = _model_config(cfg, tokenizer, precision)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    mask_id = cfg.noise.mask_token_id if cfg.noise.mask_token_id is not None else tokenizer.mask_id
    if not 0 <= mask_id < model_cfg.vocab_size:
        raise ConfigError(
            f"noise.mask_token_id={mask_id} is outside the vocabulary [0, {model_cfg.vocab_size}); "
            "leave it null to use the tokenizer's [MASK]"
        )
    model = build_model(
        model_cfg,
        block_size=cfg.curriculum.target_block_size,
        seed=cfg.train.seed,
        parallel_output=cfg.loss.fused,
        sequence_parallel=cfg.parallel.sequence_parallel,
    )
    num_params = _count_params(model)
    if rank == 0 and cfg.checkpoint.save:
        checkpointing.check_free_space(cfg.checkpoint.save, num_params, precision)
    model = _wrap_ddp(model, cfg)
    optimizer = _build_optimizer(model, cfg, precision)
    dataset = _build_dataset(cfg, tokenizer)
    rt = _Runtime(
        cfg,
        device,
        dp,
        ps.get_data_parallel_rank(),
        rank,
        world,
        model,
        optimizer,
        dataset,
        int(mask_id),
        tokenizer,
        num_params,
        objective=objective,
    )

    start_step = 0
    ck = cfg.checkpoint
    rt.writer = AsyncWriter() if ck.async_save and ck.save else None
    resumed_from = None
    plan = _prepare_start(cfg, rank, notes)
    rt.run_identity = run_identity(cfg.to_dict(), tokenizer, int(mask_id))
    changes = checkpointing.check_start(plan, rt.run_identity, cfg.to_dict())
    if plan.path is not None:
        info = checkpointing.load_checkpoint(
            plan.path,
            [model],
            optimizer,
            weights_only=plan.weights_only,
            fully_parallel=ck.fully_parallel_load,
        )
        start_step = int(info["step"])
        resumed_from = info["loaded_from"]
        rt.loaded_state = info
        rt.start_step = start_step
        rt.consumed_at_start = int(
            info.get("consumed_samples", start_step * cfg.train.global_batch_size)
        )
        if start_step > cfg.train.steps:
            raise ConfigError(
                f"checkpoint {resumed_from} is at step {start_step}, past train.steps="
                f"{cfg.train.steps}; raise --train.steps to continue training"
            )
    if cfg.parallel.cp > 1:
        rt.cp_layout = ContextParallelLayout.current(cfg.seq_length())
    rt.batches = _data_iterator(rt)

    metrics_path, tb_dir = _paths(cfg)
    kept_aside = None
    if rank == 0 and metrics_path and not plan.same_run:
        # Rule 3: the metrics of an earlier start (with no checkpoint to continue) are kept.
        kept_aside = keep_aside(metrics_path)
    logger = RunLogger(
        enabled=rank == 0,
        total_steps=cfg.train.steps,
        start_step=start_step,
        log_interval=cfg.logging.log_interval,
        metrics_file=metrics_path,
        tensorboard_dir=tb_dir,
        progress_bar=cfg.logging.progress_bar,
        label=label,
        wandb_project=cfg.logging.wandb_project,
        wandb_mode=cfg.logging.wandb_mode,
        wandb_dir=ck.save,
        wandb_id=_wandb_id(ck.save),
    )
    job = cluster.job_metadata()
    if rank == 0 and ck.save:
        Path(ck.save).mkdir(parents=True, exist_ok=True)
        (Path(ck.save) / "config.yaml").write_text(dump_config(cfg))
        run_dir.record_run_files(ck.save, cfg)
        if done_marker is not None:  # train.steps was raised: the run goes on, no longer complete
            checkpointing.clear_completion_marker(ck.save)
        _record_start(Path(ck.save), job, start_step, resumed_from, resume_command)
    _announce(logger, cfg, rt, precision, start_step, plan.note, job)
    for note in notes:
        logger.info(f"  {note}")
    if changes:
        logger.info(f"  changed since {resumed_from}: " + "; ".join(changes))
    if kept_aside:
        logger.info(f"  kept the metrics of an earlier start as {kept_aside}")
    _report_sft(logger, cfg, dataset)
    logger.run_metadata({"config": cfg.to_dict(), "job": job, "start_step": start_step})

    peak = cfg.logging.peak_tflops or guess_peak_tflops()
    # The model FLOPs of a step as `nbdiff plan` counts them (the MFU of the log and of the plan agree).
    nbdiff_flops, ar_flops = step_flops(cfg)
    flops = ar_flops if objective == "ar" else nbdiff_flops
    fwd_bwd = get_forward_backward_func()
    guard = faults.NonFiniteGuard(cfg.faults.max_consecutive_nonfinite)
    fc = cfg.faults
    health = faults.Health(
        faults.SpikeGuard(
            loss_factor=fc.spike_factor,
            grad_factor=fc.grad_spike_factor,
            window=fc.spike_window,
            max_consecutive=fc.max_consecutive_spikes,
        ),
        faults.LevelShiftGuard(factor=fc.level_factor, window=fc.level_window),
    )
    rt.health = health
    healthy = faults.HealthyCheckpoints(confirm_after=fc.level_window if fc.level_factor else 0)
    handler = faults.PreemptionHandler().install() if fc.save_on_signal else None
    launcher = faults.LauncherWatch()
    result = TrainResult(final_step=start_step, num_params=num_params)
    last_saved = start_step if plan.mode in ("continue", "resume") else None
    if last_saved is not None:
        health.load_state(rt.loaded_state.get("health"))
    if (
        last_saved is not None
        and ck.save
        and Path(resumed_from).parent.resolve() == Path(ck.save).resolve()
    ):
        healthy.started_from(last_saved)
    try:
        # `step` is k = 1..train.steps: B, λ, LR, noise seed, log line and checkpoint of step k.
        for step in range(start_step + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            terms, grad_norm = _train_step(rt, step, fwd_bwd)
            if on_cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            loss = float(terms[0])
            # An AR step is the B = 1, λ = 1 point of the curriculum.
            block = 1 if objective == "ar" else cfg.step_schedule().block_size(step)
            try:
                ok = guard.check(step, loss, grad_norm)
                spike = ok and not health.check(step, loss, grad_norm, regime=block)
            except faults.TrainingHalted as exc:
                raise _halt(rt, cfg, exc, healthy, step, resume_command) from None
            healthy.step_done(step, ok and not spike)
            tokens_per_s = cfg.tokens_per_step() / max(elapsed, 1e-9)
            record = StepRecord(
                step=step,
                loss=loss,
                mdm=float(terms[1]),
                ar=float(terms[2]),
                block_size=block,
                ar_weight=1.0 if objective == "ar" else cfg.step_schedule().ar_weight(step),
                lr=cfg.step_schedule().lr(step),
                grad_norm=grad_norm,
                skipped=not ok,
                mask_kind=cfg.curriculum.mask_kind,
                anneal_progress=cfg.step_schedule().anneal_progress(step),
                step_time=elapsed,
                tokens_per_s=tokens_per_s,
                mfu=(flops / elapsed / (world * peak * 1e12)) if peak else None,
                spike=spike,
            )
            logger.log_step(record)
            result.history.append(record.to_json())
            result.final_step = step
            result.skipped_steps = guard.total_skipped
            faults.maybe_kill_after_step(step)
            if rt.writer is not None:  # finalise a background save whose writes are done
                rt.writer.finalize(wait=False)

            done = step == cfg.train.steps
            preempted, orphaned = faults.any_rank_true_each(
                handler is not None and handler.poll() is not None, launcher.gone()
            )
            if orphaned:
                raise _orphaned(cfg, step)
            due = ck.save and (step % ck.save_interval == 0 or done or preempted)
            if due:
                result.checkpoint = str(_save(rt, cfg, step, logger, healthy, job))
            if preempted:
                _finish_saves(rt)  # the checkpoint is complete before the process exits
                result.stopped_by_signal = handler.poll() or "signal"
                logger.info(
                    f"received {result.stopped_by_signal}: "
                    + (
                        f"checkpoint saved at step {step} ({result.checkpoint}); exiting cleanly."
                        if ck.save
                        else "no checkpoint.save configured, nothing saved; exiting cleanly."
                    )
                )
                if ck.save:
                    logger.info(
                        "resume with the same command (it continues from the newest checkpoint "
                        f"in {ck.save}): {resume_command or 'nbdiff train ... (unchanged)'}"
                    )
                break
        # Every way out of the loop above has saved its last step (the final step and a preemption
        # are always due); a halt raises.
        _finish_saves(rt)
        if ck.save and result.stopped_by_signal is None and result.final_step == cfg.train.steps:
            if rank == 0:
                checkpointing.write_completion_marker(
                    ck.save, result.final_step, {"checkpoint": result.checkpoint, "job": job}
                )
            if dist.is_initialized():
                dist.barrier()
    finally:
        if handler is not None:
            handler.uninstall()
        logger.close()
    if result.stopped_by_signal is None:
        _farewell(logger, cfg, result, metrics_path, tb_dir)
    return result


def _halt(
    rt: _Runtime,
    cfg: TrainConfig,
    exc: faults.TrainingHalted,
    healthy: faults.HealthyCheckpoints,
    step: int,
    command: str | None,
) -> faults.TrainingHalted:
    """The TrainingHalted to raise: with the suspect checkpoints set aside and `latest` pointing at
    the last good one (never the checkpoint this start resumed from: it is kept), whose path and the
    command to continue from it the message names. Nothing is ever advised to be deleted."""
    save = cfg.checkpoint.save
    if not save:
        return exc
    _finish_saves(rt)
    level = isinstance(exc, faults.LevelShift)
    good = healthy.last_good(level_shift=level)
    suspect = healthy.suspect(level_shift=level)
    if rt.rank == 0:
        checkpointing.set_aside(save, suspect, good)
    if dist.is_initialized():
        dist.barrier()
    aside = (
        f"; the {len(suspect)} checkpoint(s) written after it were moved to "
        f"{Path(save) / checkpointing.ANOMALOUS_DIR} (kept for a look)"
        if suspect
        else ""
    )
    rerun = (
        f"{command or 'the same nbdiff train command'} with a lower --optimizer.lr (or after "
        f"checking the data around step {step})"
    )
    if good is None:
        where = (
            "No checkpoint of this start was verified healthy (the anomaly began before one was)"
            f"{aside}. Re-run {rerun}: it starts again at step 0 and keeps this run's files"
        )
    elif good == healthy.resumed and good != healthy.healthy:
        path = Path(save) / checkpointing.checkpoint_name(good)
        where = (
            f"This start resumed from {path} (step {good}, written by an earlier start), which is "
            f"kept and `latest` points at it{aside}. Continue from it with: {rerun}"
        )
    else:
        path = Path(save) / checkpointing.checkpoint_name(good)
        where = (
            f"The last healthy checkpoint is {path} (step {good}); `latest` points at it{aside}. "
            f"Resume from it with: {rerun}"
        )
    return type(exc)(f"{exc} {where}")


def _orphaned(cfg: TrainConfig, step: int) -> faults.LauncherGone:
    """The error of a worker whose torchrun launcher died: it stops rather than train on alone."""
    kept = (
        f"the newest checkpoint in {cfg.checkpoint.save} is kept; re-running the command continues "
        "from it"
        if cfg.checkpoint.save
        else "nothing was saved"
    )
    return faults.LauncherGone(
        f"the launcher that started this worker (torchrun) is gone: stopping after step {step} "
        f"instead of training on without it ({kept})"
    )


def _wandb_id(save: str | None) -> str | None:
    """One W&B run id per save directory: every restart of a run continues the same W&B run."""
    import hashlib

    if not save:
        return None
    return hashlib.sha1(str(Path(save).resolve()).encode()).hexdigest()[:16]


def _record_start(
    save: Path, job: dict[str, Any], start_step: int, loaded: str | None, command: str | None
) -> None:
    """Append one line per start of the run to <save>/runs.jsonl (where and from what it ran)."""
    import json

    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "start_step": start_step,
        "loaded": loaded,
        "command": command,
        **job,
    }
    with (save / "runs.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def _save(
    rt: _Runtime,
    cfg: TrainConfig,
    step: int,
    logger: RunLogger,
    healthy: faults.HealthyCheckpoints,
    job: dict[str, Any],
) -> Path:
    """Save the checkpoint of `step`: at once, or with checkpoint.async_save handed to the background
    writer (after the previous background save was finalised: one in flight at a time)."""
    t0 = time.perf_counter()
    _finish_param_sync(rt.model)
    if rt.writer is not None:
        rt.writer.finalize(wait=True)

    def complete(path: Path) -> None:
        how = "written in the background" if rt.writer is not None else "saved"
        logger.info(f"checkpoint {path} {how} ({time.perf_counter() - t0:.1f} s)")

    path = checkpointing.save_checkpoint(
        cfg.checkpoint.save,
        step,
        [rt.model],
        rt.optimizer,
        {
            "config": cfg.to_dict(),
            "consumed_samples": rt.consumed_at_start
            + (step - rt.start_step) * cfg.train.global_batch_size,
            "tokenizer": {"type": cfg.data.tokenizer_type, "model": cfg.data.tokenizer_model},
            "job": job,
            "health": rt.health.state() if rt.health is not None else None,
            "run": rt.run_identity,
            # blocks count from each packed document's start (docs/METHOD.md §3): decoders align so
            "block_align": "document",
        },
        keep_last=cfg.checkpoint.keep_last,
        # Asked when the checkpoint is finalised (later, with async_save).
        protect=healthy.protected,
        optimizer_sharding=cfg.checkpoint.optimizer_sharding,
        writer=rt.writer,
        on_complete=complete,
        fully_parallel=cfg.checkpoint.fully_parallel_save,
    )
    healthy.saved_at(step)
    if rt.writer is not None:
        logger.info(
            f"checkpoint of step {step} handed to the background writer "
            f"({time.perf_counter() - t0:.1f} s of training time)"
        )
    return path


def _finish_saves(rt: _Runtime) -> None:
    """Wait for the background save in flight (checkpoint.async_save) and finalise it: before the
    run ends, exits on a signal or sets checkpoints aside. All ranks call it."""
    if rt.writer is not None:
        rt.writer.finalize(wait=True)


def _announce(
    logger: RunLogger,
    cfg: TrainConfig,
    rt: _Runtime,
    precision: str,
    start: int,
    how: str,
    job: dict[str, Any],
) -> None:
    par = cfg.parallel
    m = cfg.model
    lines = [
        f"nbdiff train: {rt.num_params / 1e6:.2f}M parameters ({rt.num_params:,}; "
        f"{m.num_layers} layers, hidden "
        f"{m.hidden_size}, vocab {m.vocab_size}), L = {cfg.seq_length()} ("
        + (
            "AR objective: causal forward on L"
            if rt.objective == "ar"
            else f"forward on 2L = {2 * cfg.seq_length()}"
        )
        + f"), {precision} on {rt.device.type}",
        f"  layout: tp {par.tp} x pp {par.pp} x cp {par.cp} x dp {rt.dp} = {rt.world} processes; "
        f"global batch {cfg.train.global_batch_size} = {rt.dp} x "
        f"{cfg.train.global_batch_size // rt.dp // cfg.train.micro_batch_size} micro-batches x "
        f"{cfg.train.micro_batch_size}",
        "  objective: AR (next-token CE on x_0; the curriculum and the noise are not used)"
        if rt.objective == "ar"
        else f"  curriculum: B {cfg.curriculum.start_block_size} -> "
        f"{cfg.curriculum.target_block_size} (x{cfg.curriculum.growth_base} every "
        f"{cfg.curriculum.growth_interval} steps after {cfg.curriculum.growth_warmup}), λ = "
        f"{cfg.curriculum.ar_weight}, mask {cfg.curriculum.mask_kind}, token shift "
        f"{'on' if cfg.loss.token_shift else 'off'}",
        f"  steps {start} -> {cfg.train.steps}, {cfg.tokens_per_step():,} tokens/step, "
        f"{cfg.token_budget():,} tokens in all",
    ]
    lines.append(f"  {how}")
    if "job_id" in job:
        lines.append(
            f"  SLURM job {job['job_id']} on {job.get('nodes', job['host'])}"
            + (f" (restart {job['restart_count']})" if job.get("restart_count") else "")
        )
    for line in lines:
        logger.info(line)


def closing_summary(history: list[dict[str, Any]], final_step: int, total_steps: int) -> str:
    """The 'done' line: steps run by this start vs the run's total, and a like-with-like loss change.

    The loss is compared between the first and the last step at the LAST step's block size: losses at
    different block sizes (B = 1 is plain AR, B = 32 masks whole blocks) are not comparable.
    """
    ran = len(history)
    first_step = int(history[0]["step"])
    span = f"steps {first_step}-{final_step}" if ran > 1 else f"step {final_step}"
    text = (
        f"done: {ran} step{'s' if ran != 1 else ''} this start ({span}), {final_step}/{total_steps}"
    )
    block = history[-1].get("block_size")
    same = [r for r in history if r.get("block_size") == block]
    if len(same) >= 2:
        a, b = same[0], same[-1]
        text += (
            f"; loss at B={block}: {a['loss']:.4f} (step {a['step']}) -> {b['loss']:.4f} "
            f"(step {b['step']})"
        )
    else:
        text += f"; loss {history[-1]['loss']:.4f} at B={block}"
    return text


def _report_sft(logger: RunLogger, cfg: TrainConfig, dataset: Any) -> None:
    """SFT accounting: conversations kept, truncated and dropped (by reason), never silent."""
    stats = getattr(dataset, "stats", None)
    if stats is None:
        return
    for line in f"SFT data: {stats.format()}".splitlines():
        logger.info(f"  {line}")
    too_long = sum(n for reason, n in stats.skipped.items() if "model.seq_length" in reason)
    if too_long and cfg.data.sft_overflow == "drop":
        logger.info(
            f"  {too_long} conversations were longer than model.seq_length={cfg.seq_length()}: "
            "raise it, or keep their first exchanges with --data.sft_overflow=truncate_turns"
        )


def _farewell(
    logger: RunLogger, cfg: TrainConfig, result: TrainResult, metrics: str | None, tb: str | None
) -> None:
    if not logger.enabled or not result.history:
        return
    logger.info(
        closing_summary(result.history, result.final_step, cfg.train.steps)
        + (
            f"; {result.skipped_steps} step(s) skipped (non-finite loss or gradients)"
            if result.skipped_steps
            else ""
        )
    )
    for name, value in (
        ("checkpoint", result.checkpoint),
        ("metrics", metrics),
        ("tensorboard", tb),
    ):
        if value:
            logger.info(f"  {name:<11} {value}")
