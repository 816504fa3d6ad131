"""`nbdiff train`: load the YAML config, apply `--section.field=value` overrides, train.

nbdiff train --config examples/tiny_cpu.yaml --train.steps=50 --checkpoint.save=runs/tiny
torchrun --nproc-per-node 2 -m nbdiff_megatron.cli train --config ... --parallel.tp=2
nbdiff train --config ... --save runs/tiny            # run again: continues from runs/tiny
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import torch

from nbdiff_megatron.errors import ConfigError
from nbdiff_megatron.model.parallel import destroy_parallel
from nbdiff_megatron.training.config import (
    TrainConfig,
    check_launch,
    check_world_size,
    dump_config,
    load_config,
)

# Unknown `--a.b=value` arguments are handed to `run` as config overrides (see nbdiff_megatron/cli.py).
ACCEPTS_OVERRIDES = True


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--model-config``: the job's config files, for every command that loads
    them as `nbdiff train` does (train, plan, build-index: ``load_config(args.config, ...,
    model_file=args.model_config)``)."""
    parser.add_argument("--config", required=True, help="YAML config, e.g. examples/tiny_cpu.yaml")
    parser.add_argument(
        "--model-config",
        default=None,
        help="model.yaml written by `nbdiff convert hf-to-mcore`: its model shape replaces the "
        "config's (the config keeps model.seq_length, params_dtype, attention_backend, and "
        "rotary_base / rope_scaling where it sets them; one line at start lists what differs); "
        "--model.* overrides still apply after it",
    )


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--load",
        default=None,
        help="checkpoint to resume from (a save directory or one iter_XXXXXXX); "
        "same as --checkpoint.load",
    )
    parser.add_argument(
        "--save", default=None, help="checkpoint directory; same as --checkpoint.save"
    )
    parser.add_argument(
        "--finetune",
        action="store_true",
        help="load only the weights from --load (start the next phase); same as "
        "--checkpoint.finetune=true",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the validated config as YAML and exit"
    )
    parser.add_argument(
        "--print-save-dir",
        action="store_true",
        help="print checkpoint.save (empty when unset) and exit; the SLURM launcher reads it",
    )
    parser.epilog = (
        "Any config field can be overridden as --section.field=value, e.g. --train.steps=100 "
        "--optimizer.lr=1e-4 --parallel.tp=2."
    )


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """Config overrides: the free `--a.b=value` arguments plus the --load/--save/--finetune shortcuts."""
    overrides = list(getattr(args, "overrides", None) or [])
    if args.load:
        overrides.append(f"--checkpoint.load={args.load}")
    if args.save:
        overrides.append(f"--checkpoint.save={args.save}")
    if args.finetune:
        overrides.append("--checkpoint.finetune=true")
    return overrides


def _check_launch_early(cfg: TrainConfig) -> None:
    """A layout that does not match the launched processes fails here, before megatron-core is
    imported (seconds per process); then with every launch problem, as `train` reports them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        check_world_size(cfg, world)
    except ConfigError:
        check_launch(cfg, world, torch.cuda.is_available())
        raise


NO_SAVE_NOTE = (
    "note: checkpoint.save is unset: this run saves no checkpoint (pass --save DIR or "
    "--checkpoint.save=DIR to keep what it trains)"
)


def _say(text: str, *, stderr: bool = False) -> None:
    """Print once per launch (rank 0), as the run's own report does."""
    if os.environ.get("RANK", "0") in ("", "0"):
        print(text, file=sys.stderr if stderr else sys.stdout, flush=True)


def run(args: argparse.Namespace) -> int:
    notes: list[str] = []
    cfg = load_config(
        args.config, overrides_from_args(args), model_file=args.model_config, notes=notes
    )
    for note in notes:  # on stderr: --print-config's YAML stays clean on stdout
        _say(note, stderr=True)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if args.print_save_dir:
        print(cfg.checkpoint.save or "")
        return 0
    _check_launch_early(cfg)
    # lazy: training.loop imports megatron-core (seconds); --print-config, --print-save-dir and a
    # launch error answer without it
    from nbdiff_megatron.training.loop import train

    if not cfg.checkpoint.save:
        _say(NO_SAVE_NOTE)
    try:
        train(cfg, resume_command=launch_command(getattr(args, "argv", None)))
    finally:
        destroy_parallel()
    if not cfg.checkpoint.save:
        _say(NO_SAVE_NOTE.replace("this run saves", "this run saved"))
    return 0


def launch_command(argv: list[str] | None) -> str | None:
    """The command line that started this training process, as the user would type it again.

    Under torchrun the launcher's own flags are rebuilt from its environment (processes per node,
    nodes); the rendezvous flags of a multi-node launch are the user's own and shown as `...`.
    """
    if argv is None:
        return None
    train_args = shlex.join(["train", *argv])
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_WORLD_SIZE" not in os.environ:
        return f"nbdiff {train_args}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    nodes = max(1, int(os.environ.get("WORLD_SIZE", str(local))) // max(local, 1))
    launcher = f"torchrun --nproc-per-node {local}"
    if nodes > 1:
        launcher += f" --nnodes {nodes} ..."
    return f"{launcher} -m nbdiff_megatron.cli {train_args}"
