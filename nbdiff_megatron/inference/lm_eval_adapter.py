"""`nbdiff eval`: lm-evaluation-harness (`lm_eval`, the optional extra `eval`) over our decoders.

    nbdiff eval --load CKPT --task-jsonl tests/inference/assets/gsm8k_mini.jsonl --limit 20
    nbdiff eval --load CKPT --include-path my_tasks/ --tasks my_task1,my_task2

`NBDiffLM` is an `lm_eval.api.model.LM`:
- `generate_until`: block decoding (BlockDecoder; `--ar` for the AR baseline) with the request's
  `until` strings as stop strings (checked after every block, then cut), `max_gen_toks` as the budget and
  `do_sample` / `temperature` honoured.
- `loglikelihood` / `loglikelihood_rolling` (`--loglikelihood`):
  - "causal": the model's **causal (AR) log-likelihood**: one causal forward over context +
    continuation, summing log p(token_i | tokens_<i) over the continuation (`is_greedy` = every
    continuation token is the argmax). Exact for the model's clean (x_0) half, which NBDiff trains
    with the AR loss L_AR (NBDIFF.md §4); cheap (one forward per request) and deterministic.
  - "diffusion": the seeded Monte Carlo estimate of the block-diffusion bound (likelihood.py), blocks
    laid out as in decoding; `--ll-samples` draws per block. The default follows the checkpoint:
    diffusion when it was trained with λ = 0 or the block-causal mask (no meaningful AR head).
  Inputs longer than the context are truncated from the left.

Hub tasks cannot be downloaded here: use local task YAMLs (`--include-path`) or `--task-jsonl FILE`, which
builds a GSM8K-style task ({"question", "answer" ending in "#### N"}, exact match on N) around a local file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from nbdiff_megatron.errors import InferenceError

LOGLIKELIHOODS = ("causal", "diffusion")


def _require_lm_eval() -> Any:
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import LM
    except ImportError as exc:
        raise InferenceError(
            "nbdiff eval needs lm-evaluation-harness: pip install 'nbdiff-megatron[eval]' "
            "(or pip install lm-eval)"
        ) from exc
    return LM


GSM8K_STYLE_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore:
      - ","
      - "\\\\$"
      - "(?s).*#### "
      - "\\\\.$"
generation_kwargs:
  until:
    - "Question:"
    - "\\n\\n"
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_gen_toks}
filter_list:
  - name: "strict-match"
    filter:
      - function: "regex"
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: "take_first"
  - name: "flexible-extract"
    filter:
      - function: "regex"
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: "take_first"
metadata:
  version: 1.0
"""


def write_gsm8k_style_task(
    jsonl: str | Path, directory: str | Path, *, name: str = "gsm8k_local", max_gen_toks: int = 256
) -> str:
    """Write an lm-eval task YAML for a local GSM8K-style JSONL into `directory`; returns the task name."""
    jsonl = Path(jsonl).resolve()
    if not jsonl.is_file():
        raise InferenceError(f"--task-jsonl {jsonl} does not exist")
    first = jsonl.read_text(encoding="utf-8").splitlines()[:1]
    try:
        record = json.loads(first[0]) if first else None
    except json.JSONDecodeError as exc:
        raise InferenceError(f"{jsonl}:1 is not valid JSON ({exc})") from exc
    if not isinstance(record, dict) or not {"question", "answer"} <= set(record):
        raise InferenceError(
            f"{jsonl} must hold one JSON object per line with 'question' and 'answer' fields "
            "(the answer ending in '#### <number>')"
        )
    text = GSM8K_STYLE_TASK.format(
        name=name, path=json.dumps(str(jsonl)), max_gen_toks=max_gen_toks
    )
    Path(directory, f"{name}.yaml").write_text(text, encoding="utf-8")
    return name


def padded_width(width: int, max_context: int) -> int:
    """The input width the causal scorer pads a batch of `width` tokens to: the next power of two
    (at least 16; multiples of 1024 past 1024), at most `max_context`. A few widths instead of one
    per request length: compiled FlexAttention and the BlockMask cache see few shapes."""
    bucket = max(16, 1 << (max(width, 1) - 1).bit_length())
    if bucket > 1024:
        bucket = -(-width // 1024) * 1024
    return max(width, 1, min(bucket, max_context))


def make_lm_class() -> type:
    """The NBDiffLM class (built lazily: lm_eval is an optional dependency)."""
    LM = _require_lm_eval()

    class NBDiffLM(LM):
        """lm-eval model over an NBDiff megatron-core model (see the module docstring)."""

        def __init__(
            self,
            loaded: Any,
            decoder: Any,
            *,
            batch_size: int = 8,
            max_gen_toks: int = 256,
            loglikelihood: str = "causal",
            scorer: Any = None,
            ll_samples: int = 8,
            seed: int = 0,
        ) -> None:
            super().__init__()
            if loglikelihood not in LOGLIKELIHOODS:
                raise InferenceError(
                    f"--loglikelihood must be one of {', '.join(LOGLIKELIHOODS)}, got "
                    f"{loglikelihood!r}"
                )
            if loglikelihood == "diffusion" and scorer is None:
                raise InferenceError("the diffusion log-likelihood needs a BlockDecoder (scorer)")
            self.loglikelihood_mode = loglikelihood
            self.scorer = scorer
            self.ll_samples = ll_samples
            self.seed = seed
            self.loaded = loaded
            self.decoder = decoder
            self.tokenizer = loaded.tokenizer
            self.batch_size = batch_size
            self.max_gen_toks = max_gen_toks
            self.max_context = decoder.max_context
            self.last_stats: list[Any] = []

        # -------------------------------------------------------------- likelihood
        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            # Trailing spaces of the context belong to the continuation's first token in BPE.
            spaces = len(context) - len(context.rstrip(" "))
            if spaces:
                continuation = context[-spaces:] + continuation
                context = context[:-spaces]
            ctx = self.tokenizer.encode(context) if context else []
            cont = self.tokenizer.encode(continuation)
            if not ctx:
                ctx = [self.tokenizer.eod]
            return ctx, cont

        def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            if self.loglikelihood_mode == "diffusion":
                return self._diffusion_score(pairs)
            return self._causal_score(pairs)

        def _diffusion_score(
            self, pairs: list[tuple[list[int], list[int]]]
        ) -> list[tuple[float, bool]]:
            from nbdiff_megatron.inference.likelihood import diffusion_loglikelihood

            results: list[tuple[float, bool]] = []
            for start in range(0, len(pairs), self.batch_size):
                chunk = []
                for ctx, cont in pairs[start : start + self.batch_size]:
                    cont = cont[-(self.max_context - 1) :]
                    chunk.append((ctx[-(self.max_context - len(cont)) :], cont))
                results += diffusion_loglikelihood(
                    self.scorer,
                    chunk,
                    samples=self.ll_samples,
                    seed=self.seed,
                    row_ids=range(start, start + len(chunk)),
                )
            return results

        @torch.inference_mode()
        def _causal_score(
            self, pairs: list[tuple[list[int], list[int]]]
        ) -> list[tuple[float, bool]]:
            from nbdiff_megatron.model.builder import ar_forward

            model = self.loaded.model
            device = next(model.parameters()).device
            results: list[tuple[float, bool]] = []
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[start : start + self.batch_size]
                rows = []
                for ctx, cont in chunk:
                    if not cont:
                        rows.append((ctx[-self.max_context :], 0))
                        continue
                    ids = (ctx + cont)[-(self.max_context + 1) :]
                    rows.append((ids, len(cont)))
                # Right padding: causal attention keeps padding out of every real position.
                width = padded_width(max(len(ids) for ids, _ in rows) - 1, self.max_context)
                inputs = torch.full((len(rows), width), self.tokenizer.eod, dtype=torch.long)
                for i, (ids, _) in enumerate(rows):
                    inputs[i, : len(ids) - 1] = torch.tensor(ids[:-1])
                logits = ar_forward(model, inputs.to(device)).float()
                logp = torch.log_softmax(logits, dim=-1)
                for i, (ids, n) in enumerate(rows):
                    if n == 0:
                        results.append((0.0, True))
                        continue
                    targets = torch.tensor(ids[-n:], device=device)
                    span = logp[i, len(ids) - 1 - n : len(ids) - 1]
                    total = float(span.gather(-1, targets[:, None]).sum())
                    greedy = bool((span.argmax(-1) == targets).all())
                    results.append((total, greedy))
            return results

        def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
            pairs = [self._encode_pair(*req.args[:2]) for req in requests]
            return self._score(pairs)

        def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
            out = []
            for req in requests:
                ids = self.tokenizer.encode(req.args[0])
                total = 0.0
                # Non-overlapping windows, each conditioned on the previous context.
                window = self.max_context
                pairs = []
                for begin in range(0, len(ids), window):
                    ctx = ids[max(0, begin - window) : begin] or [self.tokenizer.eod]
                    pairs.append((ctx, ids[begin : begin + window]))
                for score, _ in self._score(pairs):
                    total += score
                out.append(total)
            return out

        # -------------------------------------------------------------- generation
        def generate_until(self, requests: list[Any]) -> list[str]:
            from dataclasses import replace

            from nbdiff_megatron.inference.unmasking import SamplingConfig

            results: list[str | None] = [None] * len(requests)
            # Requests sharing generation options are decoded together, in batches.
            groups: dict[str, list[int]] = {}
            for index, req in enumerate(requests):
                kwargs = dict(req.args[1]) if len(req.args) > 1 and req.args[1] else {}
                groups.setdefault(json.dumps(kwargs, sort_keys=True, default=str), []).append(index)
            for key, indices in groups.items():
                kwargs = json.loads(key)
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
                config = self.decoder.config
                if kwargs.get("do_sample") and float(kwargs.get("temperature", 1.0)) > 0:
                    config = replace(
                        config,
                        sampling=SamplingConfig(
                            float(kwargs.get("temperature", 1.0)), float(kwargs.get("top_p", 1.0))
                        ),
                    )
                elif "do_sample" in kwargs or "temperature" in kwargs:
                    config = replace(config, sampling=SamplingConfig())
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    prompts = []
                    budgets = []
                    for index in chunk:
                        ids = self.tokenizer.encode(requests[index].args[0]) or [self.tokenizer.eod]
                        room = max(1, min(max_new, self.max_context - 1))
                        ids = ids[-(self.max_context - room) :]
                        prompts.append(ids)
                        budgets.append(min(max_new, self.max_context - len(ids)))

                    def stopped(row: int, ids: list[int], until: list[str] = until) -> bool:
                        text = self.tokenizer.decode(ids, skip_special=True)
                        return any(s and s in text for s in until)

                    output = self.decoder.generate(
                        prompts,
                        stop=stopped if until else None,
                        max_new_tokens=max(budgets),
                        sampling=config.sampling,
                    )
                    self.last_stats.append(output.stats)
                    for row, index in enumerate(chunk):
                        text = self.tokenizer.decode(
                            output.tokens[row][: budgets[row]], skip_special=True
                        )
                        for s in until:
                            if s:
                                text = text.split(s)[0]
                        results[index] = text
            return [r if r is not None else "" for r in results]

    return NBDiffLM


# ----------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of `nbdiff eval`."""
    from nbdiff_megatron.inference.cli import add_decoding_arguments

    parser.add_argument(
        "--tasks", default=None, help="comma-separated task names found under --include-path"
    )
    parser.add_argument("--include-path", default=None, help="folder of local lm-eval task YAMLs")
    parser.add_argument(
        "--task-jsonl",
        default=None,
        help="a local GSM8K-style JSONL ({question, answer '... #### N'}) to run",
    )
    parser.add_argument("--limit", type=float, default=None, help="examples per task (or fraction)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples")
    parser.add_argument(
        "--max-gen-toks",
        type=int,
        default=256,
        help="generation budget when a task sets none (default 256)",
    )
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--loglikelihood",
        default=None,
        choices=LOGLIKELIHOODS,
        help="multiple-choice scores: causal (the AR head) or diffusion (Monte Carlo block-diffusion "
        "bound); default: diffusion for checkpoints trained with λ = 0 or block-causal, else causal",
    )
    parser.add_argument(
        "--ll-samples",
        type=int,
        default=8,
        help="diffusion log-likelihood: Monte Carlo draws per block (default 8; seeded by --seed)",
    )
    add_decoding_arguments(parser)


def evaluate(
    lm: Any,
    tasks: list[str],
    *,
    include_path: str | list[str],
    limit: float | None = None,
    num_fewshot: int | None = None,
) -> dict[str, Any]:
    """lm_eval.simple_evaluate on local tasks only (no hub access); returns its results dict."""
    _require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=False)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise InferenceError(
            f"unknown lm-eval task(s) {', '.join(unknown)} under {include_path}: known local tasks are "
            f"{', '.join(manager.all_tasks) or 'none'}"
        )
    from unittest import mock

    # lm-eval asks `git describe` for the commit of the working directory and lets git print
    # "fatal: not a git repository" outside one; ask the same question quietly.
    import lm_eval.evaluator  # lm_eval loads it lazily

    with mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", _quiet_git_hash):
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=False,
            bootstrap_iters=0,
        )


def _quiet_git_hash() -> str | None:
    """The commit of the current directory's git repository, or None (no message on stderr)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "describe", "--always"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def jsonable(value: Any) -> Any:
    """A JSON-ready copy of lm-eval's results: dicts stay dicts, NaN/inf become None (JSON has no
    NaN), anything else without a JSON form (functions in task configs, dtypes) becomes its str."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def run(args: argparse.Namespace) -> int:
    """`nbdiff eval`."""
    from nbdiff_megatron.inference.cli import build_decoder
    from nbdiff_megatron.inference.loading import load_for_inference

    lm_class = make_lm_class()
    if not args.tasks and not args.task_jsonl:
        raise InferenceError(
            "nothing to evaluate: pass --task-jsonl FILE or --tasks NAMES --include-path DIR"
        )
    if args.tasks and not args.include_path:
        raise InferenceError("--tasks needs --include-path (hub tasks cannot be downloaded here)")
    with tempfile.TemporaryDirectory(prefix="nbdiff_eval_") as tmp:
        paths: list[str] = [args.include_path] if args.include_path else []
        tasks = [t for t in (args.tasks or "").split(",") if t]
        if args.task_jsonl:
            tasks.append(
                write_gsm8k_style_task(args.task_jsonl, tmp, max_gen_toks=args.max_gen_toks)
            )
            paths.append(tmp)
        loaded = load_for_inference(
            args.load,
            tokenizer=args.tokenizer,
            tokenizer_type=args.tokenizer_type,
            params_dtype=args.dtype,
        )
        decoder = build_decoder(args, loaded, args.max_gen_toks)
        from nbdiff_megatron.inference.likelihood import default_loglikelihood

        mode = args.loglikelihood or default_loglikelihood(loaded.mask_kind, loaded.ar_weight)
        if args.ll_samples < 1:
            raise InferenceError(f"--ll-samples must be >= 1, got {args.ll_samples}")
        scorer = None
        if mode == "diffusion":
            scorer = (
                decoder
                if not args.ar
                else build_decoder(
                    argparse.Namespace(**{**vars(args), "ar": False}), loaded, args.max_gen_toks
                )
            )
        print(f"loglikelihood: {mode}", file=sys.stderr)
        lm = lm_class(
            loaded,
            decoder,
            batch_size=args.batch_size,
            max_gen_toks=args.max_gen_toks,
            loglikelihood=mode,
            scorer=scorer,
            ll_samples=args.ll_samples,
            seed=args.seed if args.seed is not None else 0,
        )
        results = evaluate(
            lm, tasks, include_path=paths, limit=args.limit, num_fewshot=args.num_fewshot
        )
    table = results.get("results", {})
    for task, metrics in table.items():
        shown = {
            k: v
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))
        }
        print(f"{task}: " + ", ".join(f"{k} = {v:.4f}" for k, v in sorted(shown.items())))
    if lm.last_stats:
        tokens = sum(s.generated_tokens for s in lm.last_stats)
        row_nfe = sum(s.row_forward_passes for s in lm.last_stats)
        seconds = sum(s.seconds for s in lm.last_stats)
        print(
            f"decoding: {tokens} tokens, {tokens / max(row_nfe, 1):.2f} tokens/forward, "
            f"{tokens / max(seconds, 1e-9):.1f} tokens/s",
            file=sys.stderr,
        )
    if args.output:
        record = {"results": table, "configs": results.get("configs", {})}
        Path(args.output).write_text(json.dumps(jsonable(record), indent=2, allow_nan=False))
    return 0
