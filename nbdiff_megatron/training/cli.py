"""`nbdiff train`: load the YAML config, apply `--section.field=value` overrides, train.

nbdiff train --config examples/tiny_cpu.yaml --train.steps=50 --checkpoint.save=runs/tiny
torchrun --nproc-per-node 2 -m nbdiff_megatron.cli train --config ... --parallel.tp=2
nbdiff train --config ... --load runs/tiny            # resume exactly where the run stopped
"""

from __future__ import annotations

import argparse

# Unknown `--a.b=value` arguments are handed to `run` as config overrides (see nbdiff_megatron/cli.py).
ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--config", required=True, help="YAML config, e.g. examples/tiny_cpu.yaml")
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


def run(args: argparse.Namespace) -> int:
    import warnings

    # megatron-core warns at import about optional CUDA libraries (apex, TE) a CPU run never uses.
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    from nbdiff_megatron.training.config import dump_config, load_config

    cfg = load_config(args.config, overrides_from_args(args))
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if args.print_save_dir:
        print(cfg.checkpoint.save or "")
        return 0
    from nbdiff_megatron.model.parallel import destroy_parallel
    from nbdiff_megatron.training.loop import train

    try:
        train(cfg)
    finally:
        destroy_parallel()
    return 0
