"""Set-up of a training run: the parts it is built from, once, before the first step.

`build_components` starts torch.distributed and megatron-core's parallel state, loads the tokenizer,
resolves the model config against it, builds the model, wraps it in megatron-core's
DistributedDataParallel, builds megatron-core's optimizer and the training dataset, and returns them
as one typed `Components` (as torchtitan's trainer holds its model, optimizer and data). What the
step, the checkpoints and the reports need of the run's layout is in its `Placement`.

The same code runs on CPU and GPU: megatron-core's DDP and distributed optimizer run on gloo on a CPU,
with `megatron_compat.py` mapping their CUDA assumptions (docs/GPU.md lists what stays
device-specific).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from nbdiff_megatron import megatron_compat
from nbdiff_megatron.data.config import parse_blend
from nbdiff_megatron.data.datasets import build_datasets
from nbdiff_megatron.data.loader import build_dataloader
from nbdiff_megatron.data.tokenizer import Tokenizer, load_tokenizer
from nbdiff_megatron.errors import ConfigError, DataError
from nbdiff_megatron.model.builder import build_model
from nbdiff_megatron.model.config import ModelConfig
from nbdiff_megatron.model.context_parallel import ContextParallelLayout
from nbdiff_megatron.model.parallel import initialize_parallel
from nbdiff_megatron.training import checkpointing
from nbdiff_megatron.training.config import TrainConfig, check_launch

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


Batch = dict[str, torch.Tensor]
"""One micro-batch of the data loader: tokens, doc_ids, loss_mask (and turn_ids for multi-turn SFT)."""


@dataclass(frozen=True)
class Placement:
    """Where this process sits in the run."""

    rank: int
    """Global rank (0 writes the run's files)."""
    world: int
    """Processes of the run: tp x pp x cp x dp."""
    dp: int
    """Data-parallel size."""
    dp_rank: int
    """This process's data-parallel rank (which micro-batches of the global batch it takes)."""
    device: torch.device
    """cuda:<local device> on a GPU, else cpu."""


@dataclass
class Components:
    """The parts of a run, built once by `build_components`."""

    cfg: TrainConfig
    """The run's config, with model.vocab_size from the tokenizer when it was 0 and the model's
    params_dtype set to `precision`."""
    place: Placement
    precision: str
    """bf16 or fp32 (train.precision with `auto` resolved)."""
    objective: str
    """One of OBJECTIVES: "ar" trains the same model as a plain causal LM on x_0."""
    tokenizer: Tokenizer
    mask_id: int
    """The [MASK] token id (noise.mask_token_id, else the tokenizer's)."""
    model: DistributedDataParallel
    optimizer: MegatronOptimizer
    """get_megatron_optimizer's result (a ChainedOptimizer or one of its members)."""
    dataset: torch.utils.data.Dataset
    """The training split (GPTDataset, its blend, or the packed SFT set)."""
    num_params: int
    """Parameters of the whole model, counted once (the same at any parallel layout)."""
    cp_layout: ContextParallelLayout | None = None
    """This rank's share of x_t ⊕ x_0 when parallel.cp > 1, else None."""

    def release(self) -> None:
        """Let the finished run's model, optimizer and process groups be freed.

        megatron-core's DDP registers a backward hook on each parameter's gradient accumulator, and the
        hook's closure holds the DDP; the DDP's TransformerConfig holds the optimizer (the callbacks
        `wrap_ddp` and `build_optimizer` set), and the optimizer holds views of the parameters whose
        autograd nodes lead back to those accumulators. The cycle runs through autograd's C++ nodes,
        which Python's garbage collector cannot see, so without this a process that trains more than
        once (`nbdiff ablate`, the demo, a notebook, the test suite) kept every earlier model and
        optimizer, and the threads of their gloo process groups: three per group, ~50 per run, each
        waking many times a second. Dropping the callbacks and the wrapped module breaks it; the
        parts are unusable after.
        """
        config = self.model.config
        config.grad_scale_func = None
        config.no_sync_func = None
        config.finalize_model_grads_func = None
        if "module" in self.model._modules:
            del self.model.module


def build_components(cfg: TrainConfig, objective: str) -> Components:
    """Start the process group and build model, DDP, optimizer and data, in the order every rank runs
    their collectives. Raises ConfigError for a launch or vocabulary that does not fit the config."""
    world, dp = init_distributed(cfg)  # checks the launch first: all its problems at once
    precision = resolve_precision(cfg)
    tokenizer = load_run_tokenizer(cfg)
    cfg = dataclasses.replace(cfg, model=model_config(cfg, tokenizer, precision))
    mask_id = resolve_mask_id(cfg, tokenizer)
    model = build_model(
        cfg.model,
        block_size=cfg.curriculum.target_block_size,
        seed=cfg.train.seed,
        parallel_output=cfg.loss.fused,
        sequence_parallel=cfg.parallel.sequence_parallel,
    )
    num_params = count_params(model)
    place = _placement(world, dp)
    if place.rank == 0 and cfg.checkpoint.save:
        checkpointing.check_free_space(cfg.checkpoint.save, num_params, precision)
    ddp = wrap_ddp(model, cfg)
    optimizer = build_optimizer(ddp, cfg, precision)
    dataset = build_dataset(cfg, tokenizer)
    cp_layout = ContextParallelLayout.current(cfg.seq_length()) if cfg.parallel.cp > 1 else None
    return Components(
        cfg=cfg,
        place=place,
        precision=precision,
        objective=objective,
        tokenizer=tokenizer,
        mask_id=mask_id,
        model=ddp,
        optimizer=optimizer,
        dataset=dataset,
        num_params=num_params,
        cp_layout=cp_layout,
    )


def _placement(world: int, dp: int) -> Placement:
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Placement(rank, world, dp, ps.get_data_parallel_rank(), device)


def resolve_precision(cfg: TrainConfig) -> str:
    """train.precision, with `auto` = bf16 on a GPU and fp32 on a CPU (bf16 runs on both)."""
    precision = cfg.train.precision
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return precision


def init_distributed(cfg: TrainConfig) -> tuple[int, int]:
    """Start torch.distributed + megatron parallel_state; returns (world size, dp)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = check_launch(cfg, world, torch.cuda.is_available())
    par = cfg.parallel
    initialize_parallel(
        par.tp, par.pp, par.cp, seed=cfg.train.seed, timeout_minutes=par.nccl_timeout_minutes
    )
    return world, dp


def load_run_tokenizer(cfg: TrainConfig) -> Tokenizer:
    """The tokenizer of the data section (data.tokenizer_type, data.tokenizer_model)."""
    return load_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)


def model_config(cfg: TrainConfig, tokenizer: Tokenizer, precision: str) -> ModelConfig:
    """The model section with vocab_size 0 resolved to the tokenizer's and params_dtype `precision`."""
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


def resolve_mask_id(cfg: TrainConfig, tokenizer: Tokenizer) -> int:
    """noise.mask_token_id, else the tokenizer's [MASK]; a ConfigError outside the vocabulary."""
    mask_id = cfg.noise.mask_token_id if cfg.noise.mask_token_id is not None else tokenizer.mask_id
    if not 0 <= mask_id < cfg.model.vocab_size:
        raise ConfigError(
            f"noise.mask_token_id={mask_id} is outside the vocabulary [0, {cfg.model.vocab_size}); "
            "leave it null to use the tokenizer's [MASK]"
        )
    return int(mask_id)


def wrap_ddp(model: torch.nn.Module, cfg: TrainConfig) -> DistributedDataParallel:
    """megatron-core's DDP around `model` (gradients reduced in fp32, overlap as configured)."""
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


def build_optimizer(
    model: DistributedDataParallel, cfg: TrainConfig, precision: str
) -> MegatronOptimizer:
    """megatron-core's Adam (distributed when parallel.distributed_optimizer) with its clipping."""
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


def finish_param_sync(model: DistributedDataParallel) -> None:
    """With overlap_param_gather, the parameters a DP rank does not own are all-gathered lazily, in
    the next forward's pre-hooks: complete that gather now (before a checkpoint reads the weights),
    as Megatron-LM does before it saves. No-op without it."""
    if getattr(model, "use_forward_hook", False):
        model.start_param_sync(force_sync=True)


def build_dataset(cfg: TrainConfig, tokenizer: Tokenizer) -> torch.utils.data.Dataset:
    """The training split, with as many samples as train.steps x train.global_batch_size."""
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


def data_iterator(
    cfg: TrainConfig, dataset: torch.utils.data.Dataset, place: Placement, consumed_samples: int
) -> Iterator[Batch]:
    """This DP rank's micro-batches from the samples consumed before this run on, forever.

    The sampler wraps around the dataset (an SFT set smaller than the run is repeated, in order); the
    GPT datasets are built with as many samples as the run needs.
    """
    loader = build_dataloader(
        dataset,
        cfg.train.micro_batch_size,
        consumed_samples=consumed_samples,
        data_parallel_rank=place.dp_rank,
        data_parallel_size=place.dp,
        num_workers=cfg.data.num_workers,
        cyclic=True,
    )
    return iter(loader)


def count_params(model: torch.nn.Module) -> int:
    """Parameters of the whole model (all TP/PP shards), counted once: the same at any layout.

    Summed over the TP x PP ranks; TP-replicated parameters (norms) count on TP rank 0 only, and a
    tied output layer -- a copy of the word embeddings that megatron-core keeps on the last pipeline
    stage when pp > 1 (`shared_embedding`) -- counts once, with the embeddings of the first stage.
    """
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
