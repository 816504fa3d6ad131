"""Typed configuration of `nbdiff train`: one dataclass per section, loaded from YAML.

`load_config(path, overrides)` reads a YAML file, applies `--a.b=value` overrides, converts every value to
its field's type and validates the whole config up front, so that a bad value fails in a second with a
message naming the field and the fix rather than an hour into a job. The `model` and `data` sections are
the model and data packages' own dataclasses (`ModelConfig`, `DataConfig`); the other sections live here.

Validation checks a config against its OWN parallel layout (tp, pp, cp, dp): a 128-GPU phase config can be
checked on a laptop. `check_world_size` compares the layout with the processes actually launched.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import yaml

from nbdiff_megatron.config_io import (
    Problems,
    build_dataclass,
    merge,
    parse_overrides,
    to_plain,
)
from nbdiff_megatron.errors import ConfigError
from nbdiff_megatron.method.curriculum import Curriculum
from nbdiff_megatron.method.schedules import LRSchedule
from nbdiff_megatron.training._sections import DataConfig, ModelConfig
from nbdiff_megatron.training.schedule import StepSchedule


@dataclass
class ParallelConfig:
    """How the model and the batch are split over processes (megatron-core's parallel layout)."""

    tp: int = 1
    """Tensor-parallel size: each layer's weights are split over this many ranks."""
    pp: int = 1
    """Pipeline-parallel size: the layers are split into this many consecutive stages."""
    cp: int = 1
    """Context-parallel size: the 2L-token sequence (x_t and x_0 alike) is split over this many ranks."""
    nccl_timeout_minutes: int = 60
    """How long a collective may wait before torch.distributed fails it (the default process group and
    megatron's groups). torch's default of 10 minutes is shorter than what rank 0 can spend building
    the dataset index cache behind a barrier on a first start (tens of millions of samples on shared
    storage) or loading a large checkpoint; 60 still ends a real hang within the hour. Build the
    index ahead of the job with `nbdiff build-index` to keep that wait short."""
    dp: int | None = None
    """Data-parallel size; None = world size / (tp * pp * cp). Set it in cluster configs so that they
    can be validated without launching that many processes."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (GPU, with tp > 1): shard activations of norms and dropouts."""
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (megatron-core's DistributedOptimizer; on CPU
    too, over gloo)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass (megatron-core DDP's
    bucketed, per-parameter-hook reduce). Off by default, as in Megatron-LM (--overlap-grad-reduce);
    NVIDIA's large-scale recipes turn it on together with the distributed optimizer."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward pass (needs
    distributed_optimizer and overlap_grad_reduce, as in Megatron-LM's --overlap-param-gather, off
    by default there too)."""

    def world_size(self) -> int | None:
        """Processes the layout needs, or None while dp is not fixed."""
        return None if self.dp is None else self.tp * self.pp * self.cp * self.dp


@dataclass
class NoiseConfig:
    """How x_t is drawn from x_0 (docs/METHOD.md §4, noising).

    Tokens outside the loss (SFT prompts and user turns, padding) are never masked: inference always
    sees the prompt clean (`training.batches.noise_micro_batch`).
    """

    t_min: float = 1e-3
    """Smallest masking level t (t ~ U(t_min, t_max)); > 0 keeps the 1/t ELBO weight finite."""
    t_max: float = 1.0
    """Largest masking level t."""
    per_block: bool = True
    """Draw one t per block (True) or one per sequence (False)."""
    antithetic: bool = False
    """Antithetic (mirrored) t: the second half of a micro-batch draws lo + hi - the first half's t,
    so each pair averages (lo + hi) / 2: lower-variance loss estimates (`method.noise.sample_t`)."""
    position_dependent: bool = False
    """Efficient-DLM masking: later tokens of a block are masked more often, mean kept at t."""
    skew: float = 0.5
    """Strength of position_dependent masking in [0, 1] (0 = uniform): p = t + skew * min(t, 1 - t) * w
    with w rising from -1 to 1 across the block (`method.noise.mask_probability`)."""
    mask_token_id: int | None = None
    """Id of the [MASK] token; None = the tokenizer's mask token (or the model's last vocab row)."""


@dataclass
class CurriculumConfig:
    """Block-size growth (eq. 3) and the co-scheduled AR weight λ; functions of the step only."""

    mask_kind: Literal["context_causal", "block_causal", "annealed"] = "context_causal"
    """Attention mask family (docs/METHOD.md §2): context_causal (NBDiff), block_causal (ablation; needs
    ar_weight 0) or annealed (DiffuLLaMA-style baseline: target block size from step 1, the mask
    interpolating from the B=1 to the target mask over the growth phase the growth_* fields define)."""
    start_block_size: int = 1
    """B0: block size at step 0 (1 = plain AR)."""
    target_block_size: int = 32
    """B_target: block size the growth stops at."""
    growth_base: int = 2
    """r: the block size is multiplied by r at each growth step."""
    growth_interval: int = 500
    """Δ: steps between growth steps."""
    growth_warmup: int = 0
    """s_w: steps at the start block size before the growth begins."""
    ar_weight: float = 0.5
    """λ at the start of training (total = (1 - λ) L_MDM + λ L_AR); 0 turns the AR loss off."""
    ar_weight_final: float | None = None
    """λ once the block size reaches its target; None = keep ar_weight constant."""
    ar_weight_anneal: Literal["constant", "linear", "cosine"] = "constant"
    """How λ moves from ar_weight to ar_weight_final as the block grows."""

    def build(self) -> Curriculum:
        """The block growth (eq. 3) and λ co-schedule this section describes (docs/METHOD.md §5)."""
        return Curriculum(
            target=self.target_block_size,
            start=self.start_block_size,
            base=self.growth_base,
            interval=self.growth_interval,
            warmup=self.growth_warmup,
            ar_weight_start=self.ar_weight,
            ar_weight_end=self.ar_weight if self.ar_weight_final is None else self.ar_weight_final,
            ar_weight_style=self.ar_weight_anneal,
        )


@dataclass
class LossConfig:
    """Loss options (docs/METHOD.md §4)."""

    token_shift: bool = True
    """Logit i-1 predicts token i (the AR head's meaning; NBDiff-7B decodes this way)."""
    fused: bool = True
    """Fused output projection + masked loss (kernels.nbdiff_linear_loss): only loss rows are
    projected, never [2L, V] logits, vocab-parallel under TP. false = the reference path (full
    logits, gathered over TP, then method.losses.nbdiff_loss), kept as the oracle."""
    fused_padded_projection: bool = False
    """With the fused loss: project each TP rank's whole (padded) vocabulary shard with the padding
    columns masked, instead of its real columns only (the same results; an aligned GEMM width on
    the last rank). Off until benchmarks/gpu_suite.py has timed both on a GPU."""
    validate: bool = False
    """Run the loss's spec checks every step (token ids in range, t in (0, 1], no masked token at a
    block start under token shift); they synchronise the device, so they are for tests and debugging."""


@dataclass
class OptimizerConfig:
    """Adam(W) through megatron-core's optimizer."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the cooldown."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam β1."""
    adam_beta2: float = 0.95
    """Adam β2."""
    adam_eps: float = 1e-8
    """Adam ε."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""


@dataclass
class ScheduleConfig:
    """Learning-rate schedule (`method.schedules.lr_at`).

    Step k (k = 1..train.steps, the one step numbering of method/curriculum.py) trains with `lr_at(k)`,
    Megatron-style (its scheduler has advanced once per finished step): with warm-up the first step
    already moves (peak / warmup_steps), the peak is reached at step warmup_steps, and the last step
    runs at min_lr when the schedule cools down (wsd with decay_steps > 0, cosine).
    """

    style: Literal["wsd", "cosine", "constant"] = "wsd"
    """wsd = warm-up, constant, cooldown (the two-phase schedule of NBDiff-7B); cosine; constant."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to the peak LR."""
    decay_steps: int = 0
    """wsd: the last `decay_steps` steps cool down to optimizer.min_lr (0 = no cooldown)."""
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "linear"
    """wsd: shape of the cooldown."""

    def build(self, optimizer: OptimizerConfig, steps: int) -> LRSchedule:
        """The schedule from `optimizer.lr` to `optimizer.min_lr` over a run of `steps` steps."""
        return LRSchedule(
            peak=optimizer.lr,
            min_lr=optimizer.min_lr,
            warmup=self.warmup_steps,
            total=steps,
            decay=self.decay_steps,
            style=self.style,
            decay_shape=self.decay_shape,
        )


@dataclass
class LoopConfig:
    """Batch sizes, length of the run, precision."""

    steps: int = 100
    """Optimizer steps (iterations) of this run."""
    micro_batch_size: int = 1
    """Sequences per micro-batch on each data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
    seed: int = 1234
    """Seed of the weights, the data order and the noise (noise is re-seeded every step)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 on GPU, fp32 on CPU; bf16 also runs on CPU (slowly: for tests of the bf16 path)."""
    token_budget: str | None = None
    """The tokens this phase is meant to process (e.g. '700B'): checked against steps x global batch x
    seq_length (within 5%), so a changed batch size cannot silently change the budget."""


@dataclass
class CheckpointConfig:
    """megatron-core dist_checkpointing: where, how often, what to keep, what to load."""

    save: str | None = None
    """Directory for checkpoints (iter_XXXXXXX sub-directories and a `latest` file); None = no saving."""
    save_interval: int = 1000
    """Save every this many steps (and always at the end)."""
    keep_last: int = 3
    """Keep only the newest K checkpoints; older ones are deleted after a successful save."""
    load: str | None = None
    """Checkpoint to start from: a save directory (its latest checkpoint) or one iter_XXXXXXX directory."""
    finetune: bool = False
    """Load only the weights from `load` (next phase): step, optimizer, data position start afresh."""
    optimizer_sharding: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    """How the distributed optimizer's state is written (docs/checkpoints.md): `dp_reshardable` writes
    each DP rank's shard as it is (no communication; resumes at any DP size, the same TP/PP/CP);
    `fully_reshardable` gathers it over DP into per-parameter tensors (resumes at any DP/TP/PP/CP, at
    the price of that gather at every save)."""
    async_save: bool = False
    """Write the checkpoint's shards in a background process while training goes on; it becomes
    `latest` once every rank's writes have finished (docs/checkpoints.md)."""
    fully_parallel_save: bool = True
    """Spread the writes of the tensors every DP rank holds (the weights) over the DP ranks, instead of
    the first DP rank writing them all (megatron-core's fully parallel strategy, docs/checkpoints.md)."""
    fully_parallel_load: bool = False
    """Read each shard once over the DP ranks and exchange it, instead of every rank reading what it
    needs (fewer file-system reads, more communication)."""


@dataclass
class LoggingConfig:
    """Console, TensorBoard and metrics file."""

    log_interval: int = 1
    """Print a line and write TensorBoard scalars every this many steps."""
    tensorboard_dir: str | None = None
    """TensorBoard event directory; None = <checkpoint.save>/tensorboard when saving, else off."""
    metrics_file: str | None = None
    """JSON-lines file with one record per step; None = <checkpoint.save>/metrics.jsonl when saving."""
    progress_bar: bool = True
    """Show a tqdm progress bar with ETA (rank 0)."""
    peak_tflops: float | None = None
    """Peak bf16 TFLOP/s of one GPU for the MFU estimate; None = guessed from the device name."""
    wandb_project: str | None = None
    """Weights & Biases project to log to (besides TensorBoard); None = no W&B (optional package)."""
    wandb_mode: Literal["online", "offline"] = "online"
    """W&B mode: offline writes under <checkpoint.save>/wandb for a later `wandb sync` (no network)."""


@dataclass
class FaultConfig:
    """What to do when things go wrong."""

    max_consecutive_nonfinite: int = 5
    """Halt after this many steps in a row with a NaN/inf loss (each such step is skipped)."""
    save_on_signal: bool = True
    """On SIGTERM/SIGUSR1/SIGINT (preemption, Ctrl-C): save a checkpoint at the step's end, exit 0."""
    spike_factor: float = 3.0
    """A step whose loss exceeds this many times its moving average is a loss spike; 0 = off."""
    grad_spike_factor: float = 10.0
    """A step whose gradient norm exceeds this many times its moving average is a spike; 0 = off."""
    spike_window: int = 20
    """Healthy steps in the moving averages; spikes are looked for once the window is full."""
    max_consecutive_spikes: int = 5
    """Halt after this many spike steps in a row (the checkpoint before the first one is kept)."""
    level_factor: float = 1.3
    """Halt when the mean loss of the last `level_window` steps exceeds this many times its lowest
    earlier such mean at the same block size (a lasting rise, e.g. a far too high LR); 0 = off."""
    level_window: int = 50
    """Steps in the level-shift mean; a checkpoint is trusted against level shifts this many steps
    after it was written (rotation keeps the last trusted one)."""


@dataclass
class TrainConfig:
    """Everything `nbdiff train` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape and megatron options (`nbdiff_megatron.model.config.ModelConfig`)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset and tokenizer (`nbdiff_megatron.data.config.DataConfig`)."""
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    """Noising of x_t."""
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """Block growth and AR weight."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss options."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """LR schedule."""
    train: LoopConfig = field(default_factory=LoopConfig)
    """Length, batch sizes, precision."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    faults: FaultConfig = field(default_factory=FaultConfig)
    """Fault handling."""

    def seq_length(self) -> int:
        """L: tokens of x_0 per sequence (the model sees 2L)."""
        return int(self.model.seq_length)

    def tokens_per_step(self) -> int:
        """Clean tokens (x_0) consumed per optimizer step."""
        return self.train.global_batch_size * self.seq_length()

    def token_budget(self) -> int:
        """Clean tokens consumed by the whole run."""
        return self.train.steps * self.tokens_per_step()

    def step_schedule(self) -> StepSchedule:
        """B, λ, the annealed mask's progress and the LR at step k (training/schedule.py)."""
        return StepSchedule(
            curriculum=self.curriculum.build(),
            lr_schedule=self.schedule.build(self.optimizer, self.train.steps),
            annealed_mask=self.curriculum.mask_kind == "annealed",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON serialisable)."""
        return to_plain(self)


# --------------------------------------------------------------------------------------- loading


def config_from_dict(raw: dict[str, Any], *, validate: bool = True) -> TrainConfig:
    """Build (and by default validate) a TrainConfig from a nested mapping."""
    cfg = build_dataclass(TrainConfig, raw, "")
    if validate:
        validate_config(cfg)
    return cfg


# Fields of a converter's model.yaml that describe the run, not the checkpoint: the config keeps its own.
RUN_MODEL_FIELDS = ("seq_length", "params_dtype", "attention_backend", "transformer_impl")

# The long-context fields a phase sets on purpose (phase 2 raises the RoPE base with its seq_length):
# where the config sets them, a checkpoint's model.yaml never replaces them.
CONFIG_KEEPS_MODEL_FIELDS = ("rotary_base", "rope_scaling")


def read_model_file(path: str | Path) -> dict[str, Any]:
    """The model shape in a `model.yaml` written by `nbdiff convert hf-to-mcore` (or any YAML file
    with a `model:` section), without the run's own fields (RUN_MODEL_FIELDS)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"--model-config {path} does not exist; pass the model.yaml that `nbdiff convert "
            "hf-to-mcore` wrote beside the checkpoint (e.g. ckpt/qwen3-4b/model.yaml)"
        )
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--model-config {path} is not valid YAML: {exc}") from exc
    section = loaded.get("model") if isinstance(loaded, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(f"--model-config {path} has no `model:` section")
    return {k: v for k, v in section.items() if k not in RUN_MODEL_FIELDS}


def merge_model_file(
    config_model: dict[str, Any], file_model: dict[str, Any], model_file: str | Path
) -> tuple[dict[str, Any], str | None]:
    """The model fields `model_file` contributes, and a line naming every config value that differs.

    The checkpoint's shape wins (hidden size, heads, vocabulary, ...): the weights have that shape.
    The config's long-context fields (CONFIG_KEEPS_MODEL_FIELDS) win where the config sets them.
    """
    shape = {
        k: v
        for k, v in file_model.items()
        if not (k in CONFIG_KEEPS_MODEL_FIELDS and k in config_model)
    }
    replaced = [
        f"{k}={_show(v)} (config: {_show(config_model[k])})"
        for k, v in shape.items()
        if k in config_model and config_model[k] != v
    ]
    kept = [
        f"{k}={_show(config_model[k])} (model.yaml: {_show(v)})"
        for k, v in file_model.items()
        if k not in shape and config_model[k] != v
    ]
    if not replaced and not kept:
        return shape, None
    parts = []
    if replaced:
        parts.append(f"took the checkpoint's {', '.join(replaced)}")
    if kept:
        parts.append(f"kept the config's long-context {', '.join(kept)}")
    return shape, f"--model-config {model_file}: " + "; ".join(parts)


def _show(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    *,
    validate: bool = True,
    model_file: str | Path | None = None,
    notes: list[str] | None = None,
) -> TrainConfig:
    """Read a YAML config, apply `model_file`'s model shape, then `--a.b=value` overrides, convert
    types and validate.

    `notes` (when given) receives the one line that says which config values `model_file` replaced
    and which the config kept (merge_model_file), for the caller to print at start.
    Raises ConfigError naming the file or field at fault.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {path} does not exist; pass an existing YAML file, "
                "e.g. --config examples/tiny_cpu.yaml"
            )
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
        raw = loaded
    extra = parse_overrides(list(overrides or []))
    train_extra, model_extra = extra.get("train", {}), extra.get("model", {})
    resized = {"steps", "global_batch_size"} & set(train_extra) or "seq_length" in model_extra
    if resized and "token_budget" not in train_extra and isinstance(raw.get("train"), dict):
        # The file's stated budget describes the file's run; overriding its size makes another run.
        raw = merge(raw, {"train": {"token_budget": None}})
    if model_file is not None:
        config_model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
        shape, note = merge_model_file(config_model, read_model_file(model_file), model_file)
        raw = merge(raw, {"model": shape})
        if note and notes is not None:
            notes.append(note)
    raw = merge(raw, extra)
    try:
        return config_from_dict(raw, validate=validate)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


def dump_config(cfg: TrainConfig) -> str:
    """The config as YAML (saved next to checkpoints, so a run can be reproduced)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ------------------------------------------------------------------------------------ validation

_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_token_count(text: str) -> float:
    """'700B' -> 7e11; '8.4M' -> 8.4e6; '12345' -> 12345."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMBGT]?)\s*", str(text))
    if not match:
        raise ConfigError(
            f"train.token_budget: cannot read {text!r}; write a number with an optional K/M/B/T "
            "suffix, e.g. '700B'"
        )
    return float(match.group(1)) * _SUFFIX.get(match.group(2), 1.0)


def _require(cond: bool, message: str) -> None:
    """A single check that raises: for the helpers that `Problems.check` runs (never in the middle of
    validate_config, which collects with `need`)."""
    if not cond:
        raise ConfigError(message)


def resolved_dp(cfg: TrainConfig, world_size: int | None = None) -> int:
    """Data-parallel size: the configured one, or what `world_size` leaves after tp * pp * cp."""
    par = cfg.parallel
    if par.dp is not None:
        return par.dp
    if world_size is None:
        return 1
    return max(1, world_size // (par.tp * par.pp * par.cp))


def check_world_size(cfg: TrainConfig, world_size: int) -> int:
    """Check the layout against the launched processes (every problem in one ConfigError); returns
    the data-parallel size."""
    par = cfg.parallel
    model_parallel = par.tp * par.pp * par.cp
    if world_size % model_parallel:  # nothing else can be checked without a data-parallel size
        raise ConfigError(
            f"parallel: {world_size} processes cannot be split into tp={par.tp} x pp={par.pp} x "
            f"cp={par.cp} = {model_parallel}; launch a multiple of {model_parallel} processes or "
            "change parallel.tp/pp/cp"
        )
    dp = world_size // model_parallel
    problems = Problems()
    problems.need(
        par.dp is None or par.dp == dp,
        f"parallel.dp={par.dp} but {world_size} processes with tp*pp*cp={model_parallel} give "
        f"dp={dp}; launch {(par.dp or 1) * model_parallel} processes or set --parallel.dp={dp} "
        "(or leave it out)",
    )
    problems.check(_check_batch, cfg, dp)
    problems.raise_if_any()
    return dp


def check_launch(cfg: TrainConfig, world_size: int, on_cuda: bool) -> int:
    """What depends on the launch: the layout against the processes, and the GPU-only settings
    against this machine. Reports every problem in one ConfigError; returns the data-parallel size."""
    problems = Problems()
    dp = 1
    try:
        dp = check_world_size(cfg, world_size)
    except ConfigError as exc:
        problems.add(exc)
    if not on_cuda:
        problems.need(
            cfg.model.attention_backend != "flex",
            "model.attention_backend='flex' has no backward on CPU: use --model.attention_backend="
            "sdpa (or auto) on CPU",
        )
    problems.raise_if_any()
    return dp


def _check_batch(cfg: TrainConfig, dp: int) -> None:
    loop = cfg.train
    per_step = loop.micro_batch_size * dp
    _require(
        loop.global_batch_size % per_step == 0,
        f"train.global_batch_size={loop.global_batch_size} is not divisible by "
        f"train.micro_batch_size ({loop.micro_batch_size}) x data-parallel size ({dp}) = {per_step}; "
        f"use a multiple of {per_step}, e.g. {max(per_step, loop.global_batch_size // per_step * per_step)}",
    )


def validate_config(cfg: TrainConfig) -> None:
    """Check every field and the fields against each other; raise ONE ConfigError that lists every
    problem found (each naming the field and the fix). One validator per section, in this order;
    each adds to the same list and none raises."""
    problems = Problems()
    for validate in (
        _validate_parallel,
        _validate_train,
        _validate_noise,
        _validate_curriculum,
        _validate_optimizer,
        _validate_checkpoint,
        _validate_faults,
    ):
        validate(cfg, problems)
    data_validate = getattr(cfg.data, "validate", None)
    if callable(data_validate):
        problems.check(data_validate)
    problems.raise_if_any()


def _validate_parallel(cfg: TrainConfig, problems: Problems) -> None:
    """The parallel section, and the model shape against it."""
    need, par, cur = problems.need, cfg.parallel, cfg.curriculum
    for name in ("tp", "pp", "cp"):
        need(getattr(par, name) >= 1, f"parallel.{name} must be >= 1 (got {getattr(par, name)})")
    need(par.dp is None or par.dp >= 1, f"parallel.dp must be >= 1 or null (got {par.dp})")
    need(
        par.nccl_timeout_minutes >= 1,
        f"parallel.nccl_timeout_minutes must be >= 1 (got {par.nccl_timeout_minutes}); it bounds "
        "how long a collective waits, e.g. for rank 0 building the dataset index",
    )
    need(
        par.cp < 1 or cfg.seq_length() % (2 * par.cp) == 0,
        f"model.seq_length={cfg.seq_length()} does not fit parallel.cp={par.cp}: context parallelism "
        f"cuts each half of x_t ⊕ x_0 into 2*cp = {2 * par.cp} chunks; use a seq_length divisible "
        f"by {2 * par.cp} or another cp",
    )
    # The vocabulary size may be left to the tokenizer (0 until training starts): check the rest.
    model = cfg.model
    shape = model if model.vocab_size > 0 else dataclasses.replace(model, vocab_size=1)
    if min(par.tp, par.pp, par.cp) >= 1:
        problems.check(
            partial(shape.validate, block_size=cur.target_block_size), par.tp, par.pp, par.cp
        )
    need(
        not par.sequence_parallel or par.tp > 1,
        "parallel.sequence_parallel needs parallel.tp > 1; set it to false or raise tp",
    )
    need(
        not par.overlap_param_gather or (par.distributed_optimizer and par.overlap_grad_reduce),
        "parallel.overlap_param_gather needs parallel.distributed_optimizer=true and "
        "parallel.overlap_grad_reduce=true (the gather of the sharded update is what it overlaps); "
        "set them, or set overlap_param_gather to false",
    )
    seq = cfg.seq_length()
    need(seq >= 2, f"model.seq_length must be >= 2 (got {seq})")


def _validate_train(cfg: TrainConfig, problems: Problems) -> None:
    """The train section: steps, batch sizes against the layout, the stated token budget."""
    need, loop, seq = problems.need, cfg.train, cfg.seq_length()
    need(loop.steps >= 1, f"train.steps must be >= 1 (got {loop.steps})")
    need(loop.micro_batch_size >= 1, "train.micro_batch_size must be >= 1")
    need(loop.global_batch_size >= 1, "train.global_batch_size must be >= 1")
    if loop.micro_batch_size >= 1 and loop.global_batch_size >= 1:
        problems.check(_check_batch, cfg, resolved_dp(cfg))
    if loop.token_budget is not None and seq >= 1 and loop.global_batch_size >= 1:
        problems.check(_check_token_budget, cfg)


def _validate_noise(cfg: TrainConfig, problems: Problems) -> None:
    need, noise = problems.need, cfg.noise
    need(
        0.0 < noise.t_min <= noise.t_max <= 1.0,
        f"noise: need 0 < t_min <= t_max <= 1 (got t_min={noise.t_min}, t_max={noise.t_max})",
    )
    need(
        0.0 <= noise.skew <= 1.0,
        f"noise.skew must lie in [0, 1] (0 = uniform masking), got {noise.skew}",
    )
    need(
        noise.mask_token_id is None or noise.mask_token_id >= 0,
        "noise.mask_token_id must be a token id >= 0, or null for the tokenizer's mask token",
    )


def _validate_curriculum(cfg: TrainConfig, problems: Problems) -> None:
    need, cur, seq = problems.need, cfg.curriculum, cfg.seq_length()
    need(cur.start_block_size >= 1, "curriculum.start_block_size must be >= 1")
    need(
        cur.target_block_size >= cur.start_block_size,
        f"curriculum.target_block_size={cur.target_block_size} < start_block_size="
        f"{cur.start_block_size}; the block only grows",
    )
    need(
        cur.target_block_size <= seq,
        f"curriculum.target_block_size={cur.target_block_size} exceeds model.seq_length={seq}; "
        "lower the target or lengthen the sequences",
    )
    need(cur.growth_base >= 2, f"curriculum.growth_base must be >= 2 (got {cur.growth_base})")
    need(cur.growth_interval >= 1, "curriculum.growth_interval must be >= 1")
    need(cur.growth_warmup >= 0, "curriculum.growth_warmup must be >= 0")
    for name in ("ar_weight", "ar_weight_final"):
        value = getattr(cur, name)
        need(
            value is None or 0.0 <= value <= 1.0,
            f"curriculum.{name} must lie in [0, 1] (got {value})",
        )
    need(
        cur.ar_weight_anneal == "constant" or cur.ar_weight_final is not None,
        f"curriculum.ar_weight_anneal={cur.ar_weight_anneal!r} needs curriculum.ar_weight_final",
    )
    largest_weight = max(
        cur.ar_weight, cur.ar_weight if cur.ar_weight_final is None else cur.ar_weight_final
    )
    need(
        cur.mask_kind != "block_causal" or cur.target_block_size == 1 or largest_weight == 0.0,
        f"curriculum.ar_weight={cur.ar_weight} (ar_weight_final={cur.ar_weight_final}) with "
        "curriculum.mask_kind=block_causal: the block-causal x_0 half lets clean position i see "
        "x_0[i+1] inside its block, so L_AR would train a copy task (docs/METHOD.md §4); set "
        "--curriculum.ar_weight=0 (and ar_weight_final to 0 or null) for the block-causal "
        "ablation, or use mask_kind=context_causal",
    )


def _validate_optimizer(cfg: TrainConfig, problems: Problems) -> None:
    """The optimizer and schedule sections."""
    need, opt, sch, loop = problems.need, cfg.optimizer, cfg.schedule, cfg.train
    need(opt.lr > 0, f"optimizer.lr must be > 0 (got {opt.lr})")
    need(
        0 <= opt.min_lr <= opt.lr,
        f"optimizer.min_lr={opt.min_lr} must lie in [0, optimizer.lr={opt.lr}]",
    )
    need(opt.clip_grad >= 0, "optimizer.clip_grad must be >= 0 (0 = no clipping)")
    need(0 <= opt.adam_beta1 < 1 and 0 <= opt.adam_beta2 < 1, "optimizer: Adam betas in [0, 1)")
    need(sch.warmup_steps >= 0 and sch.decay_steps >= 0, "schedule: steps must be >= 0")
    need(
        sch.warmup_steps + sch.decay_steps <= loop.steps,
        f"schedule.warmup_steps ({sch.warmup_steps}) + schedule.decay_steps ({sch.decay_steps}) "
        f"exceed train.steps ({loop.steps}); shorten them or train longer",
    )


def _validate_checkpoint(cfg: TrainConfig, problems: Problems) -> None:
    """The checkpoint and logging sections."""
    need, ck = problems.need, cfg.checkpoint
    need(ck.save_interval >= 1, f"checkpoint.save_interval must be >= 1 (got {ck.save_interval})")
    need(ck.keep_last >= 1, f"checkpoint.keep_last must be >= 1 (got {ck.keep_last})")
    need(
        not ck.finetune or ck.load is not None,
        "checkpoint.finetune=true loads weights from checkpoint.load; set --checkpoint.load=DIR",
    )
    need(cfg.logging.log_interval >= 1, "logging.log_interval must be >= 1")


def _validate_faults(cfg: TrainConfig, problems: Problems) -> None:
    need, fc = problems.need, cfg.faults
    need(fc.max_consecutive_nonfinite >= 1, "faults.max_consecutive_nonfinite must be >= 1")
    need(
        fc.spike_factor == 0 or fc.spike_factor > 1,
        "faults.spike_factor must be > 1 (or 0 to turn loss-spike detection off)",
    )
    need(
        fc.grad_spike_factor == 0 or fc.grad_spike_factor > 1,
        "faults.grad_spike_factor must be > 1 (or 0 to turn gradient-spike detection off)",
    )
    need(fc.spike_window >= 1, "faults.spike_window must be >= 1")
    need(fc.max_consecutive_spikes >= 1, "faults.max_consecutive_spikes must be >= 1")
    need(
        fc.level_factor == 0 or fc.level_factor > 1,
        "faults.level_factor must be > 1 (or 0 to turn level-shift detection off)",
    )
    need(fc.level_window >= 1, "faults.level_window must be >= 1")


def _check_token_budget(cfg: TrainConfig) -> None:
    loop, seq = cfg.train, cfg.seq_length()
    stated = parse_token_count(loop.token_budget)
    actual = cfg.token_budget()
    _require(
        abs(actual - stated) <= 0.05 * stated,
        f"train.token_budget says {loop.token_budget} but train.steps ({loop.steps}) x "
        f"train.global_batch_size ({loop.global_batch_size}) x model.seq_length ({seq}) = "
        f"{actual:.3g} tokens; fix the steps/batch or the stated budget "
        f"(steps for the budget: {math.ceil(stated / cfg.tokens_per_step())})",
    )
