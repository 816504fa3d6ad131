"""`nbdiff plan`: will a config fit, how much compute is a step, how fast must it run.

nbdiff plan --config examples/phase1_8k.yaml [--gpu-memory-gb 80] [--days 30] [--key=value ...]

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

FLOPs of one step (NBDiff on 2L tokens vs an AR step of the same model on L), the tokens/s the
phase's token budget needs in `--days`, the MFU that implies, and a verdict with what to change.
The activation + loss model is checked on CPU against measured peaks (tests/training/test_plan.py).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from nbdiff_megatron.training.checkpoint_cost import checkpoint_lines
from nbdiff_megatron.training.config import TrainConfig

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


def parameter_counts(cfg: TrainConfig, tp: int = 1) -> tuple[int, int]:
    """(parameters of one transformer layer, of the embedding table) before TP splitting."""
    m = cfg.model
    d, nq, nkv = m.head_dim, m.num_attention_heads, m.query_groups
    layer = (
        m.hidden_size * (nq + 2 * nkv) * d
        + nq * d * m.hidden_size
        + 3 * m.hidden_size * m.ffn_hidden_size
        + 2 * m.hidden_size
        + (2 * d if m.qk_layernorm else 0)
        + ((nq + 2 * nkv) * d if m.add_qkv_bias else 0)
    )
    return layer, m.padded_vocab_size(tp) * m.hidden_size


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


def _alternatives(cfg: TrainConfig, lay: Layout) -> list[tuple[str, Layout]]:
    """Changes to try, cheapest first (each builds on the previous)."""
    steps: list[tuple[str, Layout]] = []
    current = lay
    if not current.distributed_optimizer and current.dp * current.cp > 1:
        current = dataclasses.replace(current, distributed_optimizer=True)
        steps.append(("parallel.distributed_optimizer=true", current))
    if not current.fused_loss:
        current = dataclasses.replace(current, fused_loss=True)
        steps.append(("loss.fused=true", current))
    if current.tp > 1 and not current.sequence_parallel:
        current = dataclasses.replace(current, sequence_parallel=True)
        steps.append(("parallel.sequence_parallel=true", current))
    if current.recompute is None:
        current = dataclasses.replace(current, recompute="selective")
        steps.append(("model.recompute_granularity=selective", current))
    if current.recompute != "full":
        current = dataclasses.replace(current, recompute="full")
        steps.append(
            (
                "model.recompute_granularity=full --model.recompute_method=uniform "
                "--model.recompute_num_layers=1",
                current,
            )
        )
    if cfg.model.seq_length % (4 * current.cp) == 0:
        doubled = dataclasses.replace(current, cp=current.cp * 2, dp=max(1, current.dp // 2))
        steps.append((f"parallel.cp={current.cp * 2} (dp halves)", doubled))
    return steps


def plan_report(
    cfg: TrainConfig, *, gpu_memory_gb: float = 80.0, days: float = 30.0, peak_tflops: float = 989.0
) -> tuple[str, bool]:
    """The plan as text, and whether the config fits."""
    lay = layout_of(cfg)
    mem = memory(cfg, lay)
    usable = (gpu_memory_gb - _RESERVED_GIB) * GIB
    fits = mem.total <= usable
    m = cfg.model
    gpus = lay.tp * lay.pp * lay.cp * lay.dp
    lines = [
        f"model: {m.num_layers} layers, hidden {m.hidden_size}, vocab {_vocab(cfg):,}, "
        f"L = {m.seq_length} (2L = {2 * m.seq_length} tokens per sequence)",
        f"layout: tp {lay.tp} x pp {lay.pp} x cp {lay.cp} x dp {lay.dp} = {gpus} GPUs; "
        f"sp {'on' if lay.sequence_parallel else 'off'}, distributed optimizer "
        f"{'on' if lay.distributed_optimizer else 'off'}, recompute {lay.recompute or 'off'}, "
        f"loss {'fused' if lay.fused_loss else 'reference'}; {lay.micro_batches} micro-batch(es) "
        f"of {cfg.train.micro_batch_size} per step",
        "memory per GPU (worst pipeline stage):",
        f"  weights      {_fmt_gib(mem.weights)}",
        f"  gradients    {_fmt_gib(mem.gradients)}",
        f"  optimizer    {_fmt_gib(mem.optimizer)}",
        f"  activations  {_fmt_gib(mem.activations)}",
        f"  loss path    {_fmt_gib(mem.loss)}",
        f"  backward     {_fmt_gib(mem.backward)}",
        f"  total        {_fmt_gib(mem.total)} of {gpu_memory_gb:.0f} GiB "
        f"({gpu_memory_gb - _RESERVED_GIB:.0f} usable)",
    ]
    nbdiff, ar = step_flops(cfg)
    tokens = cfg.token_budget()
    step_tokens = cfg.tokens_per_step()
    needed = tokens / (days * 86400.0)
    steps_per_s = needed / step_tokens
    tflops_per_gpu = nbdiff * steps_per_s / gpus / 1e12
    lines += [
        f"compute: {nbdiff / 1e15:,.1f} PFLOP per step (an AR step of this model: "
        f"{ar / 1e15:,.1f}, ratio {nbdiff / ar:.2f}x)",
        f"budget: {tokens / 1e9:,.1f}B tokens in {days:g} days needs {needed / 1e6:,.2f}M tokens/s "
        f"({steps_per_s * 86400:,.0f} steps/day), i.e. {tflops_per_gpu:,.0f} TFLOP/s per GPU = "
        f"{100 * tflops_per_gpu / peak_tflops:.0f}% MFU at {peak_tflops:g} TFLOP/s peak",
    ]
    lines += checkpoint_lines(cfg)
    if fits:
        lines.append(f"verdict: FITS ({mem.total / GIB:.1f} GiB per GPU).")
    else:
        lines.append(
            f"verdict: DOES NOT FIT ({mem.total / GIB:.1f} GiB > {usable / GIB:.0f} GiB usable)."
        )
        for change, alt in _alternatives(cfg, lay):
            alt_total = memory(cfg, alt).total
            lines.append(f"  with --{change}: {alt_total / GIB:.1f} GiB")
            if alt_total <= usable:
                lines.append(f"  -> change: --{change} (and the steps above it)")
                break
        else:
            lines.append("  -> raise parallel.tp / parallel.pp, or lower train.micro_batch_size")
    if fits and 100 * tflops_per_gpu / peak_tflops > 60:
        lines.append(
            "  the token budget in this many days needs more than 60% MFU: add GPUs (dp) or days"
        )
    return "\n".join(lines), fits


def header_lines(cfg: TrainConfig, *, gpu_memory_gb: float = 80.0, days: float = 30.0) -> list[str]:
    """The plan in two comment lines, as the example configs quote it."""
    text, fits = plan_report(cfg, gpu_memory_gb=gpu_memory_gb, days=days)
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
    parser.add_argument("--config", required=True, help="YAML config, e.g. examples/phase1_8k.yaml")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU")
    parser.add_argument("--days", type=float, default=30.0, help="days to spend the token budget")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="peak bf16 TFLOP/s of one GPU (H100: 989)"
    )
    parser.epilog = (
        "Config fields can be overridden as --section.field=value, e.g. --parallel.tp=8."
    )


def run(args: argparse.Namespace) -> int:
    from nbdiff_megatron.training.config import load_config

    cfg = load_config(args.config, list(getattr(args, "overrides", None) or []))
    text, _ = plan_report(
        cfg, gpu_memory_gb=args.gpu_memory_gb, days=args.days, peak_tflops=args.peak_tflops
    )
    print(text)
    return 0
