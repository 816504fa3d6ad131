"""One GPU check suite: every GPU-only check and benchmark in one run, one results file, within
BUDGET_S (8 minutes) on one H100 / H200 by its own clock.

    python benchmarks/gpu_suite.py [--out gpu_suite_results.json] [--inductor-cache DIR]
    python benchmarks/gpu_suite.py --dry-run      # CPU: validate every step without a GPU

Steps, each in its own process with its own time limit (one failure does not stop the rest; the
limits and a set-up allowance add up to at most BUDGET_S, and a step never runs past the budget):

1. triton-preflight: compile and run a trivial Triton kernel. Triton builds its kernel launcher with
   a C compiler against the Python headers; when that fails the suite says why (no gcc, no Python.h,
   no triton) and skips the steps that need Triton instead of failing each of them slowly.
2. pytest-gpu: exactly the files in GPU_TESTS, `-m gpu`: FlexAttention forward + backward against
   SDPA in bf16 (also with the annealed and turn masks), the fused loss against the reference in
   bf16, the Triton chunk kernels against the torch ones, bf16 training with the distributed
   optimizer, megatron's gradient clipping, the Transformer Engine spec (where TE is installed).
3. train-check (benchmarks/gpu_train_check.py): a ~1B-shaped model (MODEL_1B) in bf16 with the
   distributed optimizer (DP = 1), compiled flex forward + backward against dense SDPA (per-step
   losses agree), a checkpoint resume, and the measured peak memory against `nbdiff plan`'s estimate.
4. train-step (benchmarks/train_step.py --objective both): the NBDiff step against an AR step of
   the same ~1B model: step times, x_0 tokens/s, MFU and the ratio NBDiff / AR (ideal 2.0x).
5. attention (benchmarks/attention.py): NBDiff mask at 2L vs causal at L, the 1B model's shapes.
6. loss-widths (benchmarks/loss.py): the fused loss against the reference at h = 4096, 2L = 16,384,
   bf16, projecting a padded TP shard over its real rows and over the whole shard (LOSS_WIDTHS;
   the faster one should be loss.fused_padded_projection's default).

All steps share one inductor / Triton cache (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR; `--inductor-
cache` keeps it across runs of the suite), so a kernel compiled by one step is loaded by the next.

`--dry-run` runs what a CPU can: the pre-flight (its diagnosis, in Triton's interpreter when triton
is installed), `pytest -m gpu --collect-only` over GPU_TESTS, the training check on a tiny fp32 model
(`--backends sdpa sdpa`: flex has no backward on CPU), the ~1B config through `nbdiff train
--print-config` and `nbdiff plan`, and each benchmark's --help. The results file holds, per step: the
commands, exit code, seconds, ok (None: skipped, with the reason) and the output's tail, and the
figures the benchmarks wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = str(REPO / "examples" / "tiny_cpu.yaml")

BUDGET_S = 480.0
"""The whole suite, by its own clock (one GPU session's slot)."""
SETUP_S = 25.0
"""Reserved in the budget for what runs outside the steps (the corpus, the results file): the step
limits add up to at most BUDGET_S - SETUP_S."""

# Exactly the files that hold gpu-marked tests (tests/test_gpu_suite.py checks this against the tree).
GPU_TESTS = [
    "tests/model/test_attention.py",
    "tests/model/test_annealed_and_turn_masks.py",
    "tests/model/test_spec_impl.py",
    "tests/kernels/test_linear_loss.py",
    "tests/kernels/test_ce_chunk.py",
    "tests/training/test_gpu_paths.py",
]

# ~1B parameters: 16 layers of 45.1M (hidden 2048, GQA 16/4 heads of 128, SwiGLU 5632) + the tied
# 151,936 x 2048 embedding (311M); L = 2048 (2L = 4096 rows), the target block size from step 1.
MODEL_1B = [
    "--model.num_layers=16",
    "--model.hidden_size=2048",
    "--model.ffn_hidden_size=5632",
    "--model.num_attention_heads=16",
    "--model.num_query_groups=4",
    "--model.vocab_size=151936",
    "--model.seq_length=2048",
    "--curriculum.start_block_size=32",
    "--curriculum.target_block_size=32",
    "--train.precision=bf16",
    "--parallel.distributed_optimizer=true",
    "--train.micro_batch_size=1",
    "--train.global_batch_size=2",
    "--train.token_budget=null",
    "--schedule.warmup_steps=0",
    "--schedule.decay_steps=0",
    "--optimizer.lr=3e-4",
    "--logging.progress_bar=false",
    "--logging.log_interval=1",
]

# benchmarks/attention.py on MODEL_1B's attention: L, micro-batch, heads, groups, head size, block.
ATTENTION_1B = [
    "--lengths",
    "2048",
    "--batch",
    "1",
    "--heads",
    "16",
    "--kv-heads",
    "4",
    "--head-dim",
    "128",
    "--block-size",
    "32",
]

# The tiny model of the dry run's training check (CPU, fp32).
TINY_CHECK = [
    "--model.num_layers=2",
    "--model.seq_length=32",
    "--curriculum.start_block_size=8",
    "--train.precision=fp32",
    "--train.micro_batch_size=2",
    "--train.global_batch_size=4",
    "--schedule.warmup_steps=0",
    "--schedule.decay_steps=0",
]

# The fused loss's two projection widths (benchmarks/loss.py arguments per width), on the case that
# motivates the choice: the last tensor-parallel rank of a vocabulary that does not divide evenly.
# V = 153,377 at TP = 4 pads to 4 x 38,400 rows, of which the last rank holds 38,177 real ones; the
# loss projects those (weight[:38177]: odd leading dimension) or, with
# loss.fused_padded_projection, the whole aligned shard with the padding columns masked.
LOSS_WIDTHS = {
    "real-rows-38177": ["--vocab", "38177", "--padded-vocab", "38400"],
    "padded-shard-38400": ["--vocab", "38177", "--padded-vocab", "38400", "--project-padded"],
}

TRITON_PREFLIGHT = '''"""Compile and run a trivial Triton kernel (written and run by benchmarks/gpu_suite.py)."""
import sys
import traceback

try:
    import triton  # first: without it the diagnosis needs no torch import
    import triton.language as tl
    import torch

    @triton.jit
    def _add_one(x_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keep = offsets < n
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=keep) + 1.0, mask=keep)

    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1
    x = torch.zeros(1000, device=device)
    _add_one[(triton.cdiv(1000, 256),)](x, 1000, BLOCK=256)
    assert float(x.sum()) == 1000.0, float(x.sum())
    print(f"triton {triton.__version__}: compiled and ran a kernel on {device}")
except Exception:
    traceback.print_exc()
    sys.exit(1)
'''

# What a failed pre-flight's output says, and what to do about it (the first match wins).
TRITON_PROBLEMS = (
    (
        ("No module named 'triton'",),
        "triton is not installed (torch's CUDA wheels bring the matching version)",
    ),
    (
        ("Python.h",),
        "Triton builds its kernel launcher against the Python headers and Python.h is missing: "
        "install this Python's headers (e.g. apt-get install python3.X-dev) or use a Python that "
        "ships them",
    ),
    (
        ("Failed to find C compiler", "gcc: not found", "No such file or directory: 'gcc'"),
        "Triton builds its kernel launcher with a C compiler and found none: install gcc or set "
        "CC to one",
    ),
)


def triton_problem(output: str) -> str:
    """Why the Triton pre-flight failed, from its output: a known cause with its fix, else the
    output's last line."""
    for needles, explanation in TRITON_PROBLEMS:
        if any(needle in output for needle in needles):
            return explanation
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "the pre-flight failed without output"


@dataclass(frozen=True)
class Step:
    name: str
    commands: list[list[str]]
    """Run one after the other, within limit_s together."""
    limit_s: float
    needs_triton: bool = False
    figures: list[Path] = field(default_factory=list)
    """JSON(-lines) files the commands write, read into the step's result."""


def _nbdiff(*args: str) -> list[str]:
    return [PY, "-m", "nbdiff_megatron.cli", *args]


def _preflight(work: Path) -> list[str]:
    script = work / "triton_preflight.py"
    script.write_text(TRITON_PREFLIGHT)
    return [PY, str(script)]


def steps(dry_run: bool, work: Path, data_args: list[str]) -> list[Step]:
    if dry_run:
        return _dry_run_steps(work, data_args)
    check_json, step_json = work / "train_check.jsonl", work / "train_step.jsonl"
    loss_json = {name: work / f"loss-{name}.json" for name in LOSS_WIDTHS}
    return [
        Step("triton-preflight", [_preflight(work)], 20),
        Step(
            "pytest-gpu",
            [[PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TESTS]],
            115,
            needs_triton=True,
        ),
        Step(
            "train-check",
            [
                [
                    PY,
                    "benchmarks/gpu_train_check.py",
                    "--config",
                    TINY,
                    "--steps",
                    "6",
                    "--work",
                    str(work),
                    "--json",
                    str(check_json),
                    *MODEL_1B,
                    *data_args,
                ]
            ],
            # Four runs of the 1B model; one writes and one loads a ~14 GiB dist-opt checkpoint.
            160,
            needs_triton=True,
            figures=[check_json],
        ),
        Step(
            "train-step",
            [
                [
                    PY,
                    "benchmarks/train_step.py",
                    "--config",
                    TINY,
                    "--objective",
                    "both",
                    "--steps",
                    "6",
                    "--warmup",
                    "2",
                    "--json",
                    str(step_json),
                    *MODEL_1B,
                    *data_args,
                ]
            ],
            # Two runs in one process (flex compiles the 2L NBDiff and the causal L masks).
            90,
            needs_triton=True,
            figures=[step_json],
        ),
        Step(
            "attention",
            # The 1B model's attention shapes: the flex kernels the training steps compiled are
            # loaded from the shared cache.
            [[PY, "benchmarks/attention.py", *ATTENTION_1B, "--iters", "5"]],
            25,
            needs_triton=True,
        ),
        Step(
            "loss-widths",
            [
                [
                    PY,
                    "benchmarks/loss.py",
                    "--device",
                    "cuda",
                    "--hidden",
                    "4096",
                    "--length",
                    "8192",
                    "--dtype",
                    "bf16",
                    "--repeats",
                    "2",
                    *width_args,
                    "--json",
                    str(loss_json[name]),
                ]
                for name, width_args in LOSS_WIDTHS.items()
            ],
            45,
            needs_triton=True,
            figures=list(loss_json.values()),
        ),
    ]


def _dry_run_steps(work: Path, data_args: list[str]) -> list[Step]:
    check_json = work / "train_check.jsonl"
    return [
        Step("triton-preflight", [_preflight(work)], 60),
        Step(
            "pytest-gpu",
            [[PY, "-m", "pytest", "-q", "-m", "gpu", "--collect-only", *GPU_TESTS]],
            300,
        ),
        Step(
            "train-check",
            [
                [
                    PY,
                    "benchmarks/gpu_train_check.py",
                    "--config",
                    TINY,
                    "--backends",
                    "sdpa",
                    "sdpa",
                    "--steps",
                    "2",
                    "--work",
                    str(work),
                    "--json",
                    str(check_json),
                    *TINY_CHECK,
                    *data_args,
                ]
            ],
            300,
            figures=[check_json],
        ),
        Step(
            "config-1b",
            [_nbdiff("train", "--config", TINY, *MODEL_1B, *data_args, "--print-config")],
            120,
        ),
        Step("plan-1b", [_nbdiff("plan", "--config", TINY, *MODEL_1B, *data_args)], 120),
        # Generous: attention.py and loss.py import torch before parsing (a minute on a busy CPU).
        Step("train-step", [[PY, "benchmarks/train_step.py", "--help"]], 180),
        Step("attention", [[PY, "benchmarks/attention.py", "--help"]], 180),
        Step("loss-widths", [[PY, "benchmarks/loss.py", "--help"]], 180),
    ]


def _run_command(cmd: list[str], timeout: float, env: dict[str, str]) -> tuple[int, str]:
    """(exit code, stdout + stderr); 124 when `timeout` ran out. The command runs in its own process
    group, killed whole on a timeout: compile workers and test subprocesses must not outlive their
    step (nor keep the GPU busy for the next one)."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=max(timeout, 0.1))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return 124, out + f"\n[timed out after {timeout:.0f} s]"


def _run(step: Step, timeout: float, env: dict[str, str]) -> dict:
    """Run the step's commands one after the other, within `timeout` together; stop at a failure."""
    start = time.perf_counter()
    code, out = 0, ""
    for cmd in step.commands:
        code, part = _run_command(cmd, timeout - (time.perf_counter() - start), env)
        out += part
        if code != 0:
            break
    return dict(
        step=step.name,
        commands=[" ".join(cmd) for cmd in step.commands],
        returncode=code,
        seconds=round(time.perf_counter() - start, 1),
        limit_s=timeout,
        ok=code == 0,
        output_tail=out[-4000:],
    )


def _skipped(step: Step, reason: str) -> dict:
    return dict(step=step.name, commands=[], returncode=None, seconds=0.0, ok=None, skipped=reason)


def _read_figures(paths: list[Path]) -> list[dict]:
    """The last JSON record of each file the step wrote (JSON lines or one JSON document)."""
    figures = []
    for path in paths:
        text = path.read_text().strip() if path.is_file() else ""
        if not text:
            continue
        try:
            figures.append(json.loads(text))
        except json.JSONDecodeError:
            figures.append(json.loads(text.splitlines()[-1]))
    return figures


def figure_lines(name: str, figures: list[dict]) -> list[str]:
    """The numbers a reader looks for, one line each (printed beside the step's verdict)."""
    lines = []
    if name == "train-check":
        for record in figures:
            gib = 2**30
            for run in record["runs"]:
                peak = run["peak_bytes"]
                measured = f"peak {peak / gib:.2f} GiB" if peak is not None else "peak -"
                lines.append(
                    f"{run['backend']}: losses {[round(x, 4) for x in run['losses']]}, {measured}"
                    f" vs plan {run['plan_bytes'] / gib:.2f} GiB"
                )
            lines.append(f"agreement {record['agreement']}, resume ok {record['resume']['ok']}")
    elif name == "train-step":
        for record in figures:
            for objective, r in record["results"].items():
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
                lines.append(
                    f"{objective}: {1000 * r['step_time_s']:.1f} ms/step, "
                    f"{r['tokens_per_s']:,.0f} x_0 tokens/s, MFU {mfu}"
                )
            lines.append(
                f"NBDiff / AR step time: {record['ratio_nbdiff_over_ar']:.2f}x (ideal 2.0x)"
            )
    elif name == "loss-widths":
        for width, record in zip(LOSS_WIDTHS, figures):
            lines.append(
                f"{width}: fused {record['fused_s']:.4f} s, reference {record['reference_s']:.4f} "
                f"s fwd+bwd"
            )
        if len(figures) == 2:
            ratio = figures[1]["fused_s"] / figures[0]["fused_s"]
            lines.append(f"fused, whole padded shard / real rows only: {ratio:.2f}x")
    return lines


def _environment(cache: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO),
        TORCHINDUCTOR_CACHE_DIR=str(cache),
        TRITON_CACHE_DIR=str(cache / "triton"),
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_suite(dry_run: bool, work: Path, cache: Path) -> dict:
    started = time.perf_counter()
    env = _environment(cache)
    if dry_run:
        env["TRITON_INTERPRET"] = "1"  # the pre-flight runs its kernel in Triton's interpreter
    sys.path.insert(0, str(REPO))
    from nbdiff_megatron.data.bundled import bundled_tokenizer_path, prepare_bundled_corpus

    prefix = prepare_bundled_corpus(str(work / "data"), max_documents=20 if dry_run else 200)
    data_args = [
        f"--data.data_path=[{prefix}]",
        f"--data.tokenizer_model={bundled_tokenizer_path()}",
    ]
    results, triton_note = [], None
    for step in steps(dry_run, work, data_args):
        # The budget holds on the GPU; a dry run's time depends on the CPU it shares.
        left = BUDGET_S - (time.perf_counter() - started) if not dry_run else step.limit_s
        if step.needs_triton and triton_note is not None:
            result = _skipped(step, f"Triton is not usable: {triton_note}")
        elif left < 5:
            result = _skipped(step, f"the suite's {BUDGET_S:.0f} s budget is spent")
        else:
            result = _run(step, min(step.limit_s, left), env)
        if step.name == "triton-preflight" and not result["ok"]:
            triton_note = triton_problem(result["output_tail"])
            result["triton_problem"] = triton_note
            result["ok"] = dry_run  # on a CPU the diagnosis is the check
        if step.figures:  # also after a failure: a partial check's numbers still tell
            result["figures"] = _read_figures(step.figures)
        _print_result(result)
        results.append(result)
    return dict(
        suite="gpu_suite",
        dry_run=dry_run,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine=platform.node(),
        budget_s=BUDGET_S,
        seconds=round(time.perf_counter() - started, 1),
        inductor_cache=str(cache),
        triton_problem=triton_note,
        ok=all(r["ok"] for r in results),
        steps=results,
    )


def _print_result(result: dict) -> None:
    if result["ok"] is None:
        print(f"[skip] {result['step']}: {result['skipped']}", flush=True)
        return
    verdict = "ok" if result["ok"] else "FAIL"
    print(
        f"[{verdict}] {result['step']}: {result['seconds']} s of {result['limit_s']:.0f}",
        flush=True,
    )
    if result.get("triton_problem"):
        print(f"  Triton is not usable: {result['triton_problem']}", flush=True)
    for line in figure_lines(result["step"], result.get("figures", [])):
        print(f"  {line}", flush=True)
    if not result["ok"]:
        print(result["output_tail"][-1500:], flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(REPO / "gpu_suite_results.json"))
    parser.add_argument("--dry-run", action="store_true", help="CPU: validate the steps only")
    parser.add_argument(
        "--inductor-cache",
        default=None,
        help="inductor / Triton cache shared by the steps (default: a folder in this run's work "
        "folder; give one to reuse compiled kernels across runs)",
    )
    args = parser.parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_suite: no CUDA device; use --dry-run on a CPU", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="nbdiff-gpu-suite-"))
    cache = Path(args.inductor_cache or work / "inductor-cache")
    summary = run_suite(args.dry_run, work, cache)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(
        f"results: {args.out} ({'all ok' if summary['ok'] else 'FAILURES'}, {summary['seconds']} s "
        f"of {BUDGET_S:.0f})"
    )
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
