"""`nbdiff convert hf-to-mcore | mcore-to-hf`: argument parsing and one call per direction."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from nbdiff_megatron.checkpoint.hf_to_mcore import hf_to_mcore
from nbdiff_megatron.convert.mcore_to_hf import mcore_to_hf

DIRECTIONS = ("hf-to-mcore", "mcore-to-hf")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the `hf-to-mcore` and `mcore-to-hf` sub-commands to `nbdiff convert`."""
    sub = parser.add_subparsers(dest="direction", metavar="{hf-to-mcore,mcore-to-hf}")
    sub.required = True

    to_mcore = sub.add_parser(
        "hf-to-mcore",
        help="HF folder -> megatron-core checkpoint",
        description="Convert an HF Qwen3 / Qwen2 / Llama (openPangu-style) "
        "folder into a megatron-core dist checkpoint for `nbdiff train`.",
    )
    to_mcore.add_argument("--hf", required=True, help="HF model folder (config.json, safetensors)")
    _common(
        to_mcore,
        dtype_help="stored dtype (default: the source's; fp16 becomes bf16)",
        tokenizer_help="tokenizer folder or file (default: the HF folder's own)",
    )
    to_mcore.add_argument(
        "--tp", type=int, default=1, help="intended tensor-parallel size (vocab padding, checks)"
    )
    to_mcore.add_argument(
        "--pp", type=int, default=1, help="intended pipeline-parallel size (checks)"
    )
    to_mcore.add_argument(
        "--mask-id",
        type=int,
        default=None,
        help="[MASK] token id (default: the tokenizer's, added when missing)",
    )
    to_mcore.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="model.seq_length to record (default: min(max positions, 4096))",
    )
    to_mcore.add_argument("--block-size", type=int, default=32, help="NBDiff target block size")
    to_mcore.add_argument(
        "--no-token-shift",
        action="store_true",
        help="record token_shift=false in the NBDiff settings",
    )
    to_mcore.add_argument(
        "--mask-kind",
        choices=("context_causal", "block_causal"),
        default="context_causal",
        help="NBDiff attention mask family",
    )
    to_mcore.add_argument(
        "--block-align",
        choices=("document", "prompt"),
        default="document",
        help="where the model's blocks start when decoding: document (ours) or "
        "prompt (the NBDiff release's decoder)",
    )

    to_hf = sub.add_parser(
        "mcore-to-hf",
        help="megatron-core checkpoint -> HF folder",
        description="Export a converted or trained megatron-core checkpoint "
        "as a transformers folder (AutoModelForCausalLM).",
    )
    to_hf.add_argument(
        "--mcore",
        required=True,
        help="save directory (its latest checkpoint) or one iter_XXXXXXX folder",
    )
    _common(
        to_hf,
        dtype_help="dtype of the safetensors (default: the recorded one)",
        tokenizer_help="tokenizer folder or file to copy (default: the checkpoint's)",
    )
    to_hf.add_argument(
        "--no-tokenizer",
        action="store_true",
        help="export without tokenizer files (by default a missing tokenizer is an error)",
    )
    to_hf.add_argument(
        "--model-config",
        default=None,
        help="YAML with a model: section, for checkpoints that record none",
    )
    to_hf.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard")


def _common(parser: argparse.ArgumentParser, *, dtype_help: str, tokenizer_help: str) -> None:
    """The options both directions take (``_common_kwargs`` passes them on)."""
    parser.add_argument("--out", required=True, help="output folder (created atomically)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help=dtype_help)
    parser.add_argument("--tokenizer", default=None, help=tokenizer_help)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _common_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``hf_to_mcore`` and ``mcore_to_hf`` that ``_common`` adds."""
    return {
        "dtype": args.dtype,
        "tokenizer": args.tokenizer,
        "overwrite": args.overwrite,
        "show_progress": not args.no_progress,
    }


def run(args: argparse.Namespace) -> int:
    """Run the chosen direction and print its summary."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.direction == "hf-to-mcore":
        summary = hf_to_mcore(
            args.hf,
            args.out,
            tp=args.tp,
            pp=args.pp,
            mask_id=args.mask_id,
            seq_length=args.seq_length,
            block_size=args.block_size,
            token_shift=not args.no_token_shift,
            mask_kind=args.mask_kind,
            block_align=args.block_align,
            **_common_kwargs(args),
        )
    else:
        summary = mcore_to_hf(
            args.mcore,
            args.out,
            model_config=args.model_config,
            max_shard_size=args.max_shard_size,
            include_tokenizer=not args.no_tokenizer,
            **_common_kwargs(args),
        )
    print(summary.format(), file=sys.stdout)
    return 0
