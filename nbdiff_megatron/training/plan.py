"""`nbdiff plan`: will a config fit, how much compute is a step, how fast must it run.

nbdiff plan --config examples/phase1_8k.yaml [--gpu-memory-gb 80] [--mfu 40] [--days N] [--key=value ...]

Per-rank memory of the config's layout (the worst pipeline stage), from the model's shapes:

- weights, gradients (megatron's DDP keeps fp32 main gradients), optimizer state (Adam: fp32 master
  copy of bf16 weights + two moments; sharded over DP x CP by the distributed optimizer);
- activations kept for backward per layer and token of the 2L sequence (`_layer_bytes_per_token`,
  counted from what autograd saves in megatron-core's local layer): norms and residual-stream tensors
  (divided by TP with sequence parallelism), q/k/v/attention output and the SwiGLU MLP (divided by
  TP), the dense-mask terms of the SDPA backend, less with recomputation (selective: the attention
  internals; full: one layer input per recomputed layer plus one layer being recomputed); the
  sequence is 2L / CP per rank; pipeline stage 0 holds `min(pp, micro-batches)` micro-batches in
  flight (1F1B);
- the loss path on the last stage: the reference path holds the [2L, V] logits gathered over TP,
  their gradient and fp32 log-softmax rows of the loss-carrying rows; the fused path holds only the
  loss rows' hidden states and one chunk of fp32 logits (kernels/linear_loss.py);
- one layer's activation gradients in flight during backward.

FLOPs of one step (NBDiff on 2L tokens vs an AR step of the same model on L), the run's duration at
`--mfu` (and the MFU a `--days` deadline needs), and a verdict with the first set of changes that fits
on the same GPUs. Overriding tp / pp / cp keeps the config's GPU count (dp is recomputed).
The activation + loss model is checked on CPU against measured peaks (tests/training/test_plan.py).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from nbdiff_megatron.errors import ConfigError
from nbdiff_megatron.training.checkpoint_cost import checkpoint_lines, parameter_counts
from nbdiff_megatron.training.cli import add_config_arguments
from nbdiff_megatron.training.config import (
    TrainConfig,
    load_config,
    parse_overrides,
    validate_config,
)

ACCEPTS_OVERRIDES = True

GIB = 1024**3
# The fused loss's fp32 chunk (kernels/linear_loss.py _CHUNK_ELEMENTS) and its backward copies.
_FUSED_CHUNK_BYTES = 4 * (1 << 25)
# Expected share of the 2L rows that carry loss: masked x_t rows (E[t] = 1/2 of L) + the x_0 rows.
_LOSS_ROW_FRACTION = 0.75
# Memory a run cannot use for tensors (CUDA context, allocator fragmentation, NCCL buffers).
_RESERVED_GIB = 6.0


@dataclass(frozen=True)
class Layout:
    """The parallel layout and the switches the plan varies."""

    tp: int
    pp: int
    cp: int
    dp: int
    sequence_parallel: bool
    distributed_optimizer: bool
    recompute: str | None
    """None, "selective" or "full" (full = every layer, uniform groups of one)."""
    fused_loss: bool
    micro_batches: int
    """Micro-batches per step on each DP rank."""


@dataclass(frozen=True)
class Memory:
    """Per-rank bytes of the worst pipeline stage."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    loss: float
    backward: float

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.loss
            + self.backward
        )


def _vocab(cfg: TrainConfig) -> int:
    return cfg.model.vocab_size or 32_000


def _layer_bytes_per_token(cfg: TrainConfig, lay: Layout, seq: int, dtype_bytes: int) -> float:
    """Bytes autograd keeps per token for one layer (no recomputation), `seq` tokens per rank."""
    m = cfg.model
    d, nq = m.head_dim, m.num_attention_heads
    sigma = lay.tp if lay.sequence_parallel else 1
    # Two RMSNorms: input, normalised input, output (the next linear's input): 3h each.
    outside = 6 * m.hidden_size / sigma
    backend = _backend(cfg)
    if backend == "sdpa":
        # q, k and v repeated to all query heads (an explicit mask rules out SDPA's GQA path), output.
        attention = 4 * nq * d
    else:  # flex: q, k, v at their own head counts, output, log-sum-exp
        attention = (2 * nq + 2 * m.query_groups) * d + nq
    rope = 4 * d
    mlp = 5 * m.ffn_hidden_size  # fc1 output (2 ffn), silu, product, fc2 input
    per_token = dtype_bytes * (outside + (attention + rope + mlp) / lay.tp)
    if backend == "sdpa":
        per_token += 4 * seq  # the float additive mask SDPA builds from the boolean one, per layer
    return per_token


def _attention_internal_bytes_per_token(
    cfg: TrainConfig, lay: Layout, seq: int, dtype_bytes: int
) -> float:
    """What selective recomputation drops: the core attention's saved tensors (and mask copy)."""
    m = cfg.model
    backend = _backend(cfg)
    d, nq = m.head_dim, m.num_attention_heads
    inner = (4 * nq * d if backend == "sdpa" else (2 * nq + 2 * m.query_groups) * d + nq) / lay.tp
    # The checkpointed attention keeps its inputs q, k, v.
    kept = (nq + 2 * m.query_groups) * d / lay.tp
    dropped = dtype_bytes * max(inner - kept, 0.0)
    if backend == "sdpa":
        dropped += 4 * seq
    return dropped


def activation_bytes(cfg: TrainConfig, lay: Layout, dtype_bytes: int) -> tuple[float, float]:
    """(activations of stage 0 with its micro-batches in flight, one layer's worth in backward)."""
    m = cfg.model
    seq = 2 * m.seq_length // lay.cp
    tokens = seq * cfg.train.micro_batch_size
    layers = m.num_layers // lay.pp
    per_layer = _layer_bytes_per_token(cfg, lay, seq, dtype_bytes) * tokens
    sigma = lay.tp if lay.sequence_parallel else 1
    layer_input = dtype_bytes * m.hidden_size / sigma * tokens
    if lay.recompute == "full":
        kept = layers * layer_input + per_layer  # inputs + the one layer being recomputed
    elif lay.recompute == "selective":
        drop = _attention_internal_bytes_per_token(cfg, lay, seq, dtype_bytes) * tokens
        kept = layers * (per_layer - drop)
    else:
        kept = layers * per_layer
    if _backend(cfg) == "sdpa":
        kept += seq * 2 * m.seq_length  # the boolean [2L/cp, 2L] mask, shared by the layers
    in_flight = min(lay.pp, lay.micro_batches)
    return kept * in_flight, per_layer


def loss_bytes(cfg: TrainConfig, lay: Layout, dtype_bytes: int) -> float:
    """The loss path's memory on the last stage (output projection + NBDiff loss)."""
    m = cfg.model
    tokens = 2 * m.seq_length // lay.cp * cfg.train.micro_batch_size
    vocab = _vocab(cfg)
    rows = _LOSS_ROW_FRACTION * tokens
    if lay.fused_loss:
        # The loss rows' hidden states and their gradient, and one fp32 chunk of logits (worked on
        # in place); in bf16 up to one more chunk's worth: the GEMM's bf16 output before the fp32
        # copy, d logits cast back for the GEMMs, the weight gradient's vocabulary slices. d W
        # itself goes into DDP's main_grad (counted in the gradients).
        chunks = 1 if dtype_bytes == 4 else 2
        return 2 * rows * m.hidden_size * dtype_bytes + chunks * min(
            _FUSED_CHUNK_BYTES, rows * 4 * vocab
        )
    # Gathered [2L, V] logits and their gradient in the model dtype, fp32 log-softmax of the rows.
    return tokens * vocab * 2 * dtype_bytes + rows * vocab * 4


def memory(cfg: TrainConfig, lay: Layout) -> Memory:
    """Per-rank memory of the worst stage (stage 0 holds the most activations, the last the loss)."""
    m = cfg.model
    bf16 = _dtype(cfg) == "bf16"
    dtype_bytes = 2 if bf16 else 4
    layer, embed = parameter_counts(cfg, lay.tp)
    params = layer * (m.num_layers // lay.pp) / lay.tp + embed / lay.tp
    if not m.tie_embeddings and lay.pp == 1:
        params += embed / lay.tp
    weights = params * dtype_bytes
    gradients = params * 4  # fp32 main gradients (grad_reduce_in_fp32)
    state = params * (12 if bf16 else 8)  # fp32 master (bf16 only) + Adam m, v
    if lay.distributed_optimizer:
        state /= lay.dp * lay.cp
    acts, layer_bytes = activation_bytes(cfg, lay, dtype_bytes)
    loss = loss_bytes(cfg, lay, dtype_bytes)
    if lay.pp > 1:
        # The last stage holds one micro-batch in flight plus the loss; report the worse stage.
        last = acts / min(lay.pp, lay.micro_batches) + loss
        acts, loss = (acts, 0.0) if acts >= last else (last - loss, loss)
    return Memory(weights, gradients, state, acts, loss, layer_bytes)


def _dtype(cfg: TrainConfig) -> str:
    # A plan is for the GPU run: "auto" precision means bf16 there.
    return "bf16" if cfg.train.precision == "auto" else cfg.train.precision


def _backend(cfg: TrainConfig) -> str:
    # "auto" attention is FlexAttention on the GPU the plan is for.
    backend = cfg.model.attention_backend
    return "flex" if backend == "auto" else backend


def layout_of(cfg: TrainConfig) -> Layout:
    par = cfg.parallel
    dp = par.dp or 1
    micro = max(1, cfg.train.global_batch_size // dp // cfg.train.micro_batch_size)
    return Layout(
        tp=par.tp,
        pp=par.pp,
        cp=par.cp,
        dp=dp,
        sequence_parallel=par.sequence_parallel and par.tp > 1,
        distributed_optimizer=par.distributed_optimizer,
        recompute=cfg.model.recompute_granularity,
        fused_loss=cfg.loss.fused,
        micro_batches=micro,
    )


def step_flops(cfg: TrainConfig) -> tuple[float, float]:
    """Training FLOPs of one step: (NBDiff on x_t ⊕ x_0, an AR step of the same model on x_0).

    Weights: 6 per parameter and token (2L tokens vs L). Attention (QK^T and PV, forward + backward:
    12 * h per visible query-key pair per layer): the NBDiff mask lets ~L^2 pairs through (x_t rows
    see the clean blocks before theirs and their own block, x_0 rows are causal) against L^2 / 2
    for AR. Output projection: the fused loss projects the loss rows only (~3/4 of 2L)."""
    m = cfg.model
    layer, embed = parameter_counts(cfg)
    seqs = cfg.train.global_batch_size
    length = m.seq_length
    dense = 6.0 * layer * m.num_layers
    attn_pair = 12.0 * m.num_layers * m.num_attention_heads * m.head_dim
    head = 6.0 * embed
    head_rows = _LOSS_ROW_FRACTION * 2 * length if cfg.loss.fused else 2 * length
    nbdiff = seqs * (dense * 2 * length + attn_pair * length**2 + head * head_rows)
    ar = seqs * (dense * length + attn_pair * length**2 / 2 + head * length)
    return nbdiff, ar


def _fmt_gib(value: float) -> str:
    return f"{value / GIB:8.2f} GiB"


# Changes the plan tries when a config does not fit, cheapest first; each is applied on top of the
# previous ones that were valid (TrainConfig -> TrainConfig; the same number of GPUs throughout).
def _switch(section: str, **changes):
    def apply(cfg: TrainConfig) -> TrainConfig:
        return dataclasses.replace(
            cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)}
        )

    return apply


def _doubled(field: str):
    """Double parallel.<field>, halving dp: the same GPUs, split another way."""

    def apply(cfg: TrainConfig) -> TrainConfig:
        par = cfg.parallel
        dp = par.dp or 1
        if dp % 2:
            raise ConfigError(f"dp={dp} cannot halve")
        extra = {"sequence_parallel": True} if field == "tp" else {}
        return dataclasses.replace(
            cfg,
            parallel=dataclasses.replace(
                par, **{field: getattr(par, field) * 2}, dp=dp // 2, **extra
            ),
        )

    return apply


def _halved_micro_batch(cfg: TrainConfig) -> TrainConfig:
    mbs = cfg.train.micro_batch_size
    if mbs == 1:
        raise ConfigError("train.micro_batch_size is 1 already")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=mbs // 2))


def _candidate_changes(cfg: TrainConfig) -> list[Callable[[TrainConfig], TrainConfig]]:
    """The changes in the order the plan tries them."""
    return [
        _switch("parallel", distributed_optimizer=True),
        _switch("loss", fused=True),
        _switch("parallel", sequence_parallel=True),
        _switch("model", recompute_granularity="selective"),
        _switch(
            "model",
            recompute_granularity="full",
            recompute_method="uniform",
            recompute_num_layers=1,
        ),
        _doubled("cp"),
        _doubled("tp"),
        _doubled("pp"),
        _halved_micro_batch,
    ]


# The fields the plan's changes touch, as the overrides that set them.
_CHANGED_FIELDS = (
    ("parallel", ("tp", "pp", "cp", "dp", "sequence_parallel", "distributed_optimizer")),
    ("loss", ("fused",)),
    ("model", ("recompute_granularity", "recompute_method", "recompute_num_layers")),
    ("train", ("micro_batch_size",)),
)


def overrides_between(before: TrainConfig, after: TrainConfig) -> list[str]:
    """The --section.field=value overrides that turn `before` into `after` (the plan's fields)."""
    out = []
    for section, fields in _CHANGED_FIELDS:
        for name in fields:
            value = getattr(getattr(after, section), name)
            if getattr(getattr(before, section), name) != value:
                text = str(value).lower() if isinstance(value, bool) else value
                out.append(f"--{section}.{name}={text}")
    return out


def planned_total(cfg: TrainConfig) -> float:
    """Per-GPU bytes of `cfg` as planned (worst pipeline stage)."""
    return memory(cfg, layout_of(cfg)).total


def first_change_that_fits(cfg: TrainConfig, usable: float) -> tuple[TrainConfig | None, float]:
    """The config reached by the shortest run of the plan's changes (cheapest first, each a valid
    config on the same GPUs that lowers the planned memory) that fits in `usable` bytes, and its
    bytes; (None, the least bytes reached) when none fits."""
    current, best = cfg, planned_total(cfg)
    for change in _candidate_changes(cfg):
        try:
            candidate = change(current)
            validate_config(candidate)
        except ConfigError:
            continue  # not possible here (dp odd, heads not divisible, ...)
        total = planned_total(candidate)
        if total >= best:
            continue  # the plan's model says it does not help
        current, best = candidate, total
        if total <= usable:
            return current, total
    return None, best


def gpus_of(cfg: TrainConfig) -> int:
    par = cfg.parallel
    return par.tp * par.pp * par.cp * (par.dp or 1)


@dataclass(frozen=True)
class PlanOptions:
    """What the plan is asked about: the GPU and the pace."""

    gpu_memory_gb: float = 80.0
    peak_tflops: float = 989.0
    """Peak bf16 TFLOP/s of one GPU (H100 SXM: 989)."""
    mfu: float = 0.4
    """Model FLOPs utilisation the run's duration is stated at."""
    days: float | None = None
    """A deadline: the MFU it would take to spend the token budget in this many days."""


def _model_lines(cfg: TrainConfig, lay: Layout) -> list[str]:
    m = cfg.model
    return [
        f"model: {m.num_layers} layers, hidden {m.hidden_size}, vocab {_vocab(cfg):,}, "
        f"L = {m.seq_length} (2L = {2 * m.seq_length} tokens per sequence)",
        f"layout: tp {lay.tp} x pp {lay.pp} x cp {lay.cp} x dp {lay.dp} = {gpus_of(cfg)} GPUs; "
        f"sp {'on' if lay.sequence_parallel else 'off'}, distributed optimizer "
        f"{'on' if lay.distributed_optimizer else 'off'}, recompute {lay.recompute or 'off'}, "
        f"loss {'fused' if lay.fused_loss else 'reference'}; {lay.micro_batches} micro-batch(es) "
        f"of {cfg.train.micro_batch_size} per step",
    ]


def _memory_lines(mem: Memory, opts: PlanOptions) -> list[str]:
    return [
        "memory per GPU (worst pipeline stage):",
        f"  weights      {_fmt_gib(mem.weights)}",
        f"  gradients    {_fmt_gib(mem.gradients)}",
        f"  optimizer    {_fmt_gib(mem.optimizer)}",
        f"  activations  {_fmt_gib(mem.activations)}",
        f"  loss path    {_fmt_gib(mem.loss)}",
        f"  backward     {_fmt_gib(mem.backward)}",
        f"  total        {_fmt_gib(mem.total)} of {opts.gpu_memory_gb:.0f} GiB "
        f"({opts.gpu_memory_gb - _RESERVED_GIB:.0f} usable)",
    ]


def _compute_lines(cfg: TrainConfig, opts: PlanOptions) -> list[str]:
    """FLOPs of a step, the run's duration at opts.mfu, and (with a deadline) the MFU it needs."""
    nbdiff, ar = step_flops(cfg)
    gpus = gpus_of(cfg)
    step_s = nbdiff / (gpus * opts.peak_tflops * 1e12 * opts.mfu)
    steps = cfg.train.steps
    tokens = steps * cfg.tokens_per_step()
    lines = [
        f"compute: {nbdiff / 1e15:,.1f} PFLOP per step (an AR step of this model: "
        f"{ar / 1e15:,.1f}, ratio {nbdiff / ar:.2f}x)",
        f"duration: at {100 * opts.mfu:g}% MFU (--mfu) on {gpus} GPUs of {opts.peak_tflops:g} "
        f"TFLOP/s, {step_s:,.2f} s per step: {steps:,} steps ({tokens / 1e9:,.1f}B tokens) take "
        f"{steps * step_s / 86400:,.1f} days",
    ]
    if opts.days is not None:
        needed_mfu = steps * nbdiff / (opts.days * 86400 * gpus * opts.peak_tflops * 1e12)
        lines.append(
            f"deadline: {steps:,} steps in {opts.days:g} days need {100 * needed_mfu:.0f}% MFU"
            + (" (more than 60%: add GPUs (dp) or days)" if needed_mfu > 0.6 else "")
        )
    return lines


def _verdict_lines(cfg: TrainConfig, mem: Memory, opts: PlanOptions) -> list[str]:
    usable = (opts.gpu_memory_gb - _RESERVED_GIB) * GIB
    if mem.total <= usable:
        return [f"verdict: FITS ({mem.total / GIB:.1f} GiB per GPU)."]
    lines = [f"verdict: DOES NOT FIT ({mem.total / GIB:.1f} GiB > {usable / GIB:.0f} GiB usable)."]
    changed, total = first_change_that_fits(cfg, usable)
    if changed is not None:
        lines.append(
            f"  -> change: {' '.join(overrides_between(cfg, changed))}: {total / GIB:.1f} GiB per "
            "GPU (the same GPUs)"
        )
    else:
        lines.append(
            f"  -> no change the plan knows fits in {usable / GIB:.0f} GiB on these "
            f"{gpus_of(cfg)} GPUs (the least it reaches: {total / GIB:.1f} GiB): use GPUs with "
            "more memory, or more GPUs for a larger tp / pp / cp"
        )
    return lines


def plan_report(
    cfg: TrainConfig,
    *,
    gpu_memory_gb: float = 80.0,
    days: float | None = None,
    peak_tflops: float = 989.0,
    mfu: float = 0.4,
) -> tuple[str, bool]:
    """The plan as text, and whether the config fits. Each section is one function of the config
    and the options; a new section is one more function in the list."""
    opts = PlanOptions(gpu_memory_gb=gpu_memory_gb, peak_tflops=peak_tflops, mfu=mfu, days=days)
    lay = layout_of(cfg)
    mem = memory(cfg, lay)
    lines = [
        *_model_lines(cfg, lay),
        *_memory_lines(mem, opts),
        *_compute_lines(cfg, opts),
        *checkpoint_lines(cfg),
        *_verdict_lines(cfg, mem, opts),
    ]
    fits = mem.total <= (gpu_memory_gb - _RESERVED_GIB) * GIB
    return "\n".join(lines), fits


def keep_gpu_count(file_cfg: TrainConfig, overrides: list[str]) -> tuple[list[str], str | None]:
    """Overrides that change tp / pp / cp but not dp keep the config's GPU count: dp is recomputed
    (added as --parallel.dp). Returns the overrides and the line that says what happened to the
    GPU count (None when it is the config's)."""
    par = file_cfg.parallel
    asked = parse_overrides(overrides).get("parallel", {})
    if par.dp is None or not {"tp", "pp", "cp", "dp"} & set(asked):
        return overrides, None
    gpus = gpus_of(file_cfg)
    model_parallel = 1
    for name in ("tp", "pp", "cp"):
        model_parallel *= int(asked.get(name, getattr(par, name)))
    if "dp" in asked:
        now = model_parallel * int(asked["dp"])
        if now == gpus:
            return overrides, None
        return (
            overrides,
            f"NOTE: this plan is for {now} GPUs, not the config's {gpus} (--parallel.dp)",
        )
    if gpus % model_parallel:
        return overrides, (
            f"WARNING: the GPU count changes: tp x pp x cp = {model_parallel} does not divide the "
            f"config's {gpus} GPUs, so dp stays {par.dp}: {model_parallel * par.dp} GPUs; pass "
            "--parallel.dp to choose"
        )
    dp = gpus // model_parallel
    note = (
        f"layout changed: dp {par.dp} -> {dp} keeps the config's {gpus} GPUs "
        "(--parallel.dp=N plans another count)"
    )
    return [*overrides, f"--parallel.dp={dp}"], note


def header_lines(cfg: TrainConfig, *, gpu_memory_gb: float = 80.0) -> list[str]:
    """The plan in two comment lines, as the example configs quote it."""
    text, fits = plan_report(cfg, gpu_memory_gb=gpu_memory_gb)
    mem = memory(cfg, layout_of(cfg))
    nbdiff, ar = step_flops(cfg)
    verdict = "FITS" if fits else "DOES NOT FIT"
    change = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("-> ")), "")
    first = (
        f"# nbdiff plan ({gpu_memory_gb:.0f} GB GPU): {verdict}, {mem.total / GIB:.2f} GiB per GPU "
        f"(weights {mem.weights / GIB:.2f}, grads {mem.gradients / GIB:.2f}, optimizer "
        f"{mem.optimizer / GIB:.2f}, activations {mem.activations / GIB:.2f}, loss "
        f"{mem.loss / GIB:.2f}, backward {mem.backward / GIB:.2f})"
    )
    second = f"#   {nbdiff / 1e15:,.1f} PFLOP per step = {nbdiff / ar:.2f}x an AR step"
    if change:
        second += f"; {change[3:]}"
    return [first, second]


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_config_arguments(parser)
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU")
    parser.add_argument(
        "--mfu",
        type=float,
        default=40.0,
        help="model FLOPs utilisation (percent) the run's duration is stated at (40)",
    )
    parser.add_argument(
        "--days", type=float, default=None, help="a deadline: the MFU it takes to finish in N days"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="peak bf16 TFLOP/s of one GPU (H100: 989)"
    )
    parser.epilog = (
        "Config fields can be overridden as --section.field=value, e.g. --parallel.tp=8 (dp is "
        "recomputed to keep the config's GPU count unless --parallel.dp is given)."
    )


def run(args: argparse.Namespace) -> int:
    if not 0 < args.mfu <= 100:
        raise ConfigError(f"--mfu {args.mfu:g} must be a percentage in (0, 100], e.g. --mfu 40")
    notes: list[str] = []
    overrides = list(getattr(args, "overrides", None) or [])
    file_cfg = load_config(args.config, validate=False, model_file=args.model_config, notes=notes)
    overrides, layout_note = keep_gpu_count(file_cfg, overrides)
    cfg = load_config(args.config, overrides, model_file=args.model_config)
    text, _ = plan_report(
        cfg,
        gpu_memory_gb=args.gpu_memory_gb,
        days=args.days,
        peak_tflops=args.peak_tflops,
        mfu=args.mfu / 100,
    )
    print("\n".join([*notes, *([layout_note] if layout_note else []), text]))
    return 0
