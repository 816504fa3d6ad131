"""The `nbdiff` command: parses the sub-command and hands over to one function per job.

Sub-command modules are imported lazily (megatron-core and transformers are slow to import), and each
exposes `add_arguments(parser, command)` and `run(args) -> int | None` (`args.command` names the
sub-command, for modules that serve several).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
import time

from nbdiff_megatron import install_compat
from nbdiff_megatron.errors import NBDiffError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("nbdiff_megatron.demo", "train a tiny AR model, adapt it with NBDiff, decode (CPU)"),
    "train": (
        "nbdiff_megatron.training.cli",
        "adapt / fine-tune a model (YAML config + --key=value)",
    ),
    "preprocess": (
        "nbdiff_megatron.data.preprocess",
        "tokenize text into Megatron indexed datasets",
    ),
    "convert": ("nbdiff_megatron.convert.cli", "convert checkpoints: hf-to-mcore, mcore-to-hf"),
    "generate": ("nbdiff_megatron.inference.cli", "decode text with block diffusion (or AR)"),
    "eval": ("nbdiff_megatron.inference.lm_eval_adapter", "evaluate with lm-evaluation-harness"),
    "plan": ("nbdiff_megatron.training.plan", "per-GPU memory, FLOPs and a verdict for a config"),
    "build-index": (
        "nbdiff_megatron.training.index_cache",
        "build a config's dataset index cache ahead of a job (one process, no GPU)",
    ),
    "show-mask": ("nbdiff_megatron.plots", "draw the 2L x 2L training mask as a PNG"),
    "show-curriculum": ("nbdiff_megatron.plots", "plot B(s), lambda(s) and the LR of a config"),
    "ablate": ("nbdiff_megatron.ablation", "the paper's Table 2 ablation: 5 variants, one command"),
}


def _usage() -> str:
    lines = ["usage: nbdiff <command> [options]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`nbdiff <command> --help` for a command's options."]
    return "\n".join(lines)


def build_parser(command: str) -> argparse.ArgumentParser:
    module_name, help_ = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"nbdiff {command}", description=help_)
    module.add_arguments(parser, command)
    parser.set_defaults(_module=module, command=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"nbdiff: unknown command '{command}'.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    # Before any sub-command imports megatron-core; the CPU patches are applied by the model builder
    # when a command builds a model (docs/ARCHITECTURE.md).
    install_compat(cpu_patches=False)
    parser = build_parser(command)
    args, extra = parser.parse_known_args(rest)
    args.argv = rest  # the sub-command's own arguments, as typed (a run prints how to resume it)
    if getattr(args._module, "ACCEPTS_OVERRIDES", False):
        args.overrides = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = args._module.run(args)
    except NBDiffError as exc:
        report_user_error(command, exc)
        return 2
    return int(code or 0)


QUIET_RANK_GRACE_S = 10.0
"""How long a rank other than 0 waits before exiting on a user error (rank 0 prints it); the
environment variable NBDIFF_QUIET_RANK_GRACE_S overrides it (seconds)."""


def quiet_rank_grace_s() -> float:
    """NBDIFF_QUIET_RANK_GRACE_S as seconds >= 0, or QUIET_RANK_GRACE_S when unset or not a number
    (the error being reported matters more than a malformed knob)."""
    try:
        return max(0.0, float(os.environ.get("NBDIFF_QUIET_RANK_GRACE_S", QUIET_RANK_GRACE_S)))
    except ValueError:
        return QUIET_RANK_GRACE_S


def report_user_error(command: str, exc: BaseException) -> None:
    """Print a user error (no traceback) once: on rank 0 under torchrun/srun, the others stay quiet.

    Every rank meets the same bad config or checkpoint and exits with the same code; printing it once
    keeps the message readable among the launcher's own report.
    """
    rank = os.environ.get("RANK", "0")
    if rank not in ("", "0"):
        # torchrun stops every worker as soon as one exits: leaving at once could stop rank 0
        # before it has printed. The launcher ends this wait when rank 0 exits.
        time.sleep(quiet_rank_grace_s())
        return
    print(f"nbdiff {command}: error: {exc}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
