"""`nbdiff generate`: decode text with block diffusion (or the AR baseline) from a checkpoint.

    nbdiff generate --load runs/tiny/ --prompt "Once upon a time" --max-new-tokens 64
    nbdiff generate --load hf_out/ --input prompts.jsonl --output out.jsonl --batch-size 8

With one prompt the text is streamed as blocks commit; with `--input` (a .jsonl file with a "prompt"
field per line, or a text file with one prompt per line) the prompts are decoded `--batch-size` at a time,
a prompt that stops handing its slot to the next one (`--no-refill`: fixed batches), and the completions
are printed (or written to `--output` as JSONL) in input order. Decoding statistics (NFE, tokens per
forward, tokens/s) go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbdiff_megatron.errors import InferenceError
from nbdiff_megatron.inference.ar import ARDecoder
from nbdiff_megatron.inference.decoder import BlockDecoder, DecodeConfig
from nbdiff_megatron.inference.refinement import (
    BLOCK_ALIGNS,
    capped_budgets,
    unmasking_config,
)
from nbdiff_megatron.inference.unmasking import UNMASKING_RULES, SamplingConfig

if TYPE_CHECKING:  # a type only: loading imports megatron-core (see load_model_from_args)
    from nbdiff_megatron.inference.loading import LoadedModel


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """Decoding options shared by `nbdiff generate` and `nbdiff eval`."""
    g = parser.add_argument_group("decoding")
    g.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="tokens per block (default: the checkpoint's target block size)",
    )
    g.add_argument(
        "--sub-block-size",
        type=int,
        default=None,
        help="refine each block in sub-blocks of this size (e.g. 8 for 32 = 4 x 8)",
    )
    g.add_argument(
        "--sub-block-cache",
        action="store_true",
        help="approximate: reuse the k/v of finished sub-blocks inside the active block (needs "
        "--sub-block-size); faster forwards, tokens may differ from the exact decoder",
    )
    g.add_argument(
        "--block-align",
        default=None,
        choices=BLOCK_ALIGNS,
        help="where blocks start: document (multiples of B from the prompt's first token, as our "
        "packing trains) or prompt (right after the prompt, as the NBDiff release decodes); default: "
        "as the checkpoint was trained",
    )
    g.add_argument(
        "--unmasking",
        default=None,
        choices=UNMASKING_RULES,
        help="which masked tokens to commit per step (default: confidence; static with "
        "--steps-per-block)",
    )
    g.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="confidence/margin/dynamic: unmask above it (default 0.9); entropy: below it (nats); "
        "entropy_bounded: the entropy budget of a step (nats)",
    )
    g.add_argument("--tokens-per-step", type=int, default=1, help="k of the topk rule")
    g.add_argument(
        "--steps-per-block",
        type=int,
        default=None,
        help="static / dynamic rules: refinement steps per block (static: B/S tokens per step by "
        "confidence; dynamic: the threshold, at least that many per step)",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0 = all)")
    g.add_argument(
        "--seed",
        type=int,
        default=None,
        help="sampling seed (each prompt draws from its own stream: the same output in any batch)",
    )
    shift = g.add_mutually_exclusive_group()
    shift.add_argument(
        "--token-shift",
        dest="token_shift",
        action="store_true",
        default=None,
        help="logit i-1 predicts token i (default: as the checkpoint was trained)",
    )
    shift.add_argument("--no-token-shift", dest="token_shift", action="store_false")
    g.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute the prefix every forward instead of using the KV cache",
    )
    g.add_argument(
        "--no-fused-commit",
        dest="fused_commit",
        action="store_false",
        help="commit each finished block in a forward of its own (the NBDiff release's schedule; "
        "same tokens, more forwards) instead of fusing it with the next block's first step",
    )
    g.add_argument("--ar", action="store_true", help="decode autoregressively (the AR baseline)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    g.add_argument(
        "--no-refill",
        dest="refill",
        action="store_false",
        help="decode the prompts in fixed batches, each until its slowest prompt stops (for "
        "comparison); default: a prompt that stops hands its batch slot to the next waiting one",
    )
    m = parser.add_argument_group("model")
    m.add_argument(
        "--load",
        required=True,
        help="megatron-core checkpoint (or save directory) or HF model folder",
    )
    m.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer")
    m.add_argument(
        "--tokenizer-type",
        default=None,
        help="HuggingFaceTokenizer | SentencePieceTokenizer | TikTokenizer",
    )
    m.add_argument(
        "--dtype",
        default=None,
        choices=("fp32", "bf16"),
        help="parameter dtype (default: the checkpoint's on GPU, fp32 on CPU)",
    )


def load_model_from_args(args: argparse.Namespace) -> LoadedModel:
    """The model that the "model" options of ``add_decoding_arguments`` name."""
    # Lazy: loading imports megatron-core (seconds), which `--help` and argument errors do not need.
    from nbdiff_megatron.inference.loading import load_for_inference

    return load_for_inference(
        args.load,
        tokenizer=args.tokenizer,
        tokenizer_type=args.tokenizer_type,
        params_dtype=args.dtype,
    )


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of `nbdiff generate`."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--input", help="prompts: .jsonl ({'prompt': ...} per line) or one per line")
    parser.add_argument("--output", default=None, help="write completions as JSONL here")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="default 128")
    parser.add_argument("--quiet-stats", action="store_true", help="do not print decoding stats")
    add_decoding_arguments(parser)


def read_prompts(path: str) -> list[str]:
    """Prompts from a .jsonl file ("prompt" / "question" / "text" field) or a text file."""
    file = Path(path)
    if not file.is_file():
        raise InferenceError(f"--input {file} does not exist")
    prompts: list[str] = []
    lines = file.read_text(encoding="utf-8").splitlines()
    if file.suffix == ".jsonl":
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InferenceError(f"{file}:{number} is not valid JSON ({exc})") from exc
            text = next(
                (
                    record[k]
                    for k in ("prompt", "question", "text")
                    if isinstance(record, dict) and k in record
                ),
                None,
            )
            if not isinstance(text, str):
                raise InferenceError(f"{file}:{number} has no string 'prompt' field")
            prompts.append(text)
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise InferenceError(f"--input {file} holds no prompts")
    return prompts


def unmasking_from_args(args: argparse.Namespace) -> Any:
    """UnmaskingConfig of --unmasking / --threshold / --tokens-per-step / --steps-per-block."""
    return unmasking_config(
        args.unmasking,
        args.threshold,
        args.tokens_per_step,
        getattr(args, "steps_per_block", None),
    )


def resolve_block_size(args: argparse.Namespace, loaded: Any) -> int:
    """--block-size (validated), else the checkpoint's; warns when larger than trained."""
    if args.block_size is None:
        return int(loaded.block_size)
    if args.block_size < 1:
        raise InferenceError(
            f"--block-size must be an integer >= 1, got {args.block_size} (omit it to use the "
            f"checkpoint's block size {loaded.block_size})"
        )
    if args.block_size > loaded.block_size:
        print(
            f"warning: --block-size {args.block_size} is larger than the block size the model was "
            f"trained for ({loaded.block_size}); expect worse text",
            file=sys.stderr,
        )
    return int(args.block_size)


def build_decoder(args: argparse.Namespace, loaded: Any, max_new_tokens: int) -> Any:
    """BlockDecoder (or ARDecoder with --ar) from the command-line options and the loaded model."""
    try:
        block_size = 1 if args.ar else resolve_block_size(args, loaded)
        config = DecodeConfig(
            block_size=block_size,
            sub_block_size=None if args.ar else args.sub_block_size,
            max_new_tokens=max_new_tokens,
            token_shift=loaded.token_shift if args.token_shift is None else args.token_shift,
            unmasking=unmasking_from_args(args),
            sampling=SamplingConfig(args.temperature, args.top_p, args.top_k),
            use_cache=not args.no_cache,
            seed=args.seed,
            mask_kind=getattr(loaded, "mask_kind", "context_causal"),
            block_align=args.block_align or getattr(loaded, "block_align", "document"),
            sub_block_cache=bool(getattr(args, "sub_block_cache", False)) and not args.ar,
            fused_commit=getattr(args, "fused_commit", True),
        )
    except ValueError as exc:
        raise InferenceError(str(exc)) from exc
    if args.ar:
        return ARDecoder(
            loaded.model, eos_ids=loaded.eos_ids, mask_id=loaded.mask_id, config=config
        )
    return BlockDecoder(loaded.model, mask_id=loaded.mask_id, eos_ids=loaded.eos_ids, config=config)


class _Streamer:
    """Prints the decoded text of one row as tokens arrive (re-decoding, so multi-byte tokens work)."""

    def __init__(self, tokenizer: Any, eos_ids: list[int], out: Any) -> None:
        self.tokenizer, self.eos_ids, self.out = tokenizer, set(eos_ids), out
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, step: int, new_tokens: list[list[int]]) -> None:
        self.ids.extend(t for t in new_tokens[0] if t not in self.eos_ids)
        text = self.tokenizer.decode(self.ids, skip_special=True)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            self.out.write(text[len(self.printed) :])
            self.out.flush()
            self.printed = text


# How each stop reason of refinement.STOP_REASONS reads on the console.
STOP_WORDS = {
    "eos": "at EOS",
    "length": "at --max-new-tokens",
    "context": "at the model's context",
    "stop": "at a stop string",
}


def stop_summary(stop_reasons: list[str], first: int) -> str:
    """'prompts 0, 2 stopped at EOS; prompt 1 stopped at --max-new-tokens' (prompts numbered from
    `first`)."""
    parts = []
    for reason, words in STOP_WORDS.items():
        rows = [str(first + i) for i, r in enumerate(stop_reasons) if r == reason]
        if rows:
            noun = "prompt" if len(rows) == 1 else "prompts"
            parts.append(f"{noun} {', '.join(rows)} stopped {words}")
    return "; ".join(parts)


def _stats_line(stats: Any, label: str, stop_reasons: list[str], first: int) -> str:
    fused = f", {stats.fused_commits} fused commits" if stats.fused_commits else ""
    return (
        f"[{label}] {stats.generated_tokens} tokens, {stats.forward_passes} forwards{fused}, "
        f"{stats.tokens_per_forward:.2f} tokens/forward, {stats.tokens_per_second:.1f} tokens/s; "
        f"{stop_summary(stop_reasons, first)}"
    )


def warn_capped(
    prompts: list[list[int]], max_new_tokens: int, max_context: int, first: int
) -> None:
    """Say which prompts cannot get --max-new-tokens because the context is full before."""
    capped = capped_budgets(prompts, max_new_tokens, max_context)
    for i, room in capped.items():
        print(
            f"note: prompt {first + i} has {len(prompts[i])} tokens; the model's context is "
            f"{max_context}, so it gets at most {room} new tokens, not --max-new-tokens "
            f"{max_new_tokens}",
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    """`nbdiff generate`."""
    if args.max_new_tokens < 1:
        raise InferenceError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise InferenceError(f"--batch-size must be >= 1, got {args.batch_size}")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.input)
    if any(not p for p in prompts):
        raise InferenceError("a prompt is empty: give some text to continue")
    loaded = load_model_from_args(args)
    decoder = build_decoder(args, loaded, args.max_new_tokens)
    tok = loaded.tokenizer
    cfg = decoder.config
    label = "ar" if args.ar else f"block {cfg.block_size}, {cfg.block_align}-aligned"
    out_file = open(args.output, "w", encoding="utf-8") if args.output else None  # noqa: SIM115
    # refilling decodes every prompt in one call that keeps `--batch-size` slots busy
    step = len(prompts) if getattr(args, "refill", True) else args.batch_size
    try:
        for start in range(0, len(prompts), step):
            chunk = prompts[start : start + step]
            ids = [tok.encode(p) for p in chunk]
            warn_capped(ids, args.max_new_tokens, decoder.max_context, start)
            stream = len(prompts) == 1 and out_file is None
            streamer = _Streamer(tok, loaded.eos_ids, sys.stdout) if stream else None
            if stream:
                sys.stdout.write(chunk[0])
                sys.stdout.flush()
            result = decoder.generate(
                ids,
                callback=streamer,
                row_ids=range(start, start + len(chunk)),
                batch_size=args.batch_size,
            )
            for i, prompt in enumerate(chunk):
                text = tok.decode(result.tokens[i], skip_special=True)
                if out_file is not None:
                    record = {
                        "prompt": prompt,
                        "completion": text,
                        "stop_reason": result.stop_reasons[i],
                    }
                    out_file.write(json.dumps(record, ensure_ascii=False) + "\n")
                elif stream:
                    if streamer is not None and text.startswith(streamer.printed):
                        sys.stdout.write(text[len(streamer.printed) :])
                    sys.stdout.write("\n")
                else:
                    sys.stdout.write(f"=== prompt {start + i}\n{prompt}{text}\n")
            if not args.quiet_stats:
                print(_stats_line(result.stats, label, result.stop_reasons, start), file=sys.stderr)
    finally:
        if out_file is not None:
            out_file.close()
    return 0
