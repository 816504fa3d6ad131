"""`nbdiff eval`: lm-evaluation-harness (`lm_eval`, the optional extra `eval`) over our decoders.

    nbdiff eval --load CKPT --task-jsonl tests/inference/assets/gsm8k_mini.jsonl --limit 20
    nbdiff eval --load CKPT --include-path my_tasks/ --tasks my_task1,my_task2
    nbdiff eval --load CKPT --tasks gsm8k --apply-chat-template --fewshot-as-multiturn \
        --thresholds 0.9,0.8,0.7 --plot tpf.png

`NBDiffLM` is an `lm_eval.api.model.LM`:
- `generate_until`: block decoding (BlockDecoder; `--ar` for the AR baseline) with the request's
  `until` strings as stop strings (checked after every block, then cut), `max_gen_toks` as the budget and
  `do_sample` / `temperature` honoured.
- `loglikelihood` / `loglikelihood_rolling` (`--loglikelihood`):
  - "causal": the model's **causal (AR) log-likelihood**: one causal forward over context +
    continuation, summing log p(token_i | tokens_<i) over the continuation (`is_greedy` = every
    continuation token is the argmax). Exact for the model's clean (x_0) half, which NBDiff trains
    with the AR loss L_AR (docs/METHOD.md §4); cheap (one forward per request) and deterministic.
  - "diffusion": the seeded Monte Carlo estimate of the block-diffusion bound (likelihood.py), blocks
    laid out as in decoding; `--ll-samples` draws per block. The default follows the checkpoint:
    diffusion when it was trained with λ = 0 or the block-causal mask (no meaningful AR head).
  Inputs longer than the context are truncated from the left.

Tasks: lm-eval's own (`--tasks gsm8k`) when their data is in the HF datasets cache or downloadable (one
message when it is not), local task YAMLs (`--include-path`), or `--task-jsonl FILE`, which builds a
GSM8K-style task ({"question", "answer" ending in "#### N"}, exact match on N) around a local file, listing
the lines it cannot score. Generation requests are decoded batch by batch per task (each task's TPF, NFE and
tokens/s are its own, eval_report.py), the batches dealt over the data-parallel ranks under torchrun.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from nbdiff_megatron.errors import InferenceError
from nbdiff_megatron.inference.cli import (
    add_decoding_arguments,
    build_decoder,
    load_model_from_args,
)
from nbdiff_megatron.inference.eval_report import (
    add_stats,
    data_parallel_group,
    is_main_rank,
    plot_accuracy_vs_tpf,
    run_sharded,
    stats_record,
    table_rows,
)
from nbdiff_megatron.inference.likelihood import default_loglikelihood, diffusion_loglikelihood
from nbdiff_megatron.inference.refinement import DecodeStats
from nbdiff_megatron.inference.unmasking import SamplingConfig

LOGLIKELIHOODS = ("causal", "diffusion")


def _require_lm_eval() -> Any:
    try:
        # optional: lm-eval is the [eval] extra; the message below says how to install it
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


def gsm8k_line_problem(line: str) -> str | None:
    """Why a line of a GSM8K-style JSONL cannot be scored (None when it can)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg})"
    if not isinstance(record, dict) or not {"question", "answer"} <= set(record):
        return "no 'question' and 'answer' fields"
    if not isinstance(record["answer"], str) or "####" not in record["answer"]:
        return "the answer has no '#### <number>' final answer"
    return None


def write_gsm8k_style_task(
    jsonl: str | Path, directory: str | Path, *, name: str = "gsm8k_local", max_gen_toks: int = 256
) -> str:
    """Write an lm-eval task YAML for a local GSM8K-style JSONL into `directory`; returns the task name.

    Lines that cannot be scored (not JSON, missing fields, an answer without `#### N`) are left out,
    counted and listed on stderr (file:line and why); none left is an error."""
    jsonl = Path(jsonl).resolve()
    if not jsonl.is_file():
        raise InferenceError(f"--task-jsonl {jsonl} does not exist")
    kept, problems = [], []
    for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        problem = gsm8k_line_problem(line)
        if problem is None:
            kept.append(line)
        else:
            problems.append(f"{jsonl}:{number}: {problem}")
    if problems and is_main_rank():
        print(f"skipped {len(problems)} malformed line(s) of {jsonl}:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
    if not kept:
        raise InferenceError(
            f"{jsonl} must hold one JSON object per line with 'question' and 'answer' fields "
            "(the answer ending in '#### <number>'); no line does"
        )
    data = Path(directory, f"{name}.jsonl")
    data.write_text("\n".join(kept) + "\n", encoding="utf-8")
    text = GSM8K_STYLE_TASK.format(name=name, path=json.dumps(str(data)), max_gen_toks=max_gen_toks)
    Path(directory, f"{name}.yaml").write_text(text, encoding="utf-8")
    return name


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """`messages` rendered with the tokenizer's jinja chat template (sandboxed, as transformers
    renders it)."""
    # lazy: only --apply-chat-template renders with jinja2 (tens of ms at import)
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(tokenizer.chat_template)
    bos = tokenizer.decode([tokenizer.bos]) if tokenizer.bos is not None else ""
    return template.render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        eos_token=tokenizer.decode([tokenizer.eod]),
        bos_token=bos,
    )


def padded_width(width: int, max_context: int) -> int:
    """The input width the causal scorer pads a batch of `width` tokens to: the next power of two
    (at least 16; multiples of 1024 past 1024), at most `max_context`. A few widths instead of one
    per request length: compiled FlexAttention and the BlockMask cache see few shapes."""
    bucket = max(16, 1 << (max(width, 1) - 1).bit_length())
    if bucket > 1024:
        bucket = -(-width // 1024) * 1024
    return max(width, 1, min(bucket, max_context))


# ----------------------------------------------------------------------------------- scoring
def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a (context, continuation) request; an empty context becomes [EOD]."""
    # Trailing spaces of the context belong to the continuation's first token in BPE.
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    ctx = tokenizer.encode(context) if context else []
    cont = tokenizer.encode(continuation)
    return ctx or [tokenizer.eod], cont


@torch.inference_mode()
def causal_scores(
    model: Any, pad_id: int, pairs: list[tuple[list[int], list[int]]], max_context: int
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), continuation is greedy) of one batch, by one causal forward."""
    # lazy: model.builder imports megatron-core; `nbdiff eval --help` must not (docs/ARCHITECTURE.md)
    from nbdiff_megatron.model.builder import ar_forward

    device = next(model.parameters()).device
    rows = []
    for ctx, cont in pairs:
        if not cont:
            rows.append((ctx[-max_context:], 0))
            continue
        rows.append(((ctx + cont)[-(max_context + 1) :], len(cont)))
    # Right padding: causal attention keeps padding out of every real position.
    width = padded_width(max(len(ids) for ids, _ in rows) - 1, max_context)
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, (ids, _) in enumerate(rows):
        inputs[i, : len(ids) - 1] = torch.tensor(ids[:-1])
    logp = torch.log_softmax(ar_forward(model, inputs.to(device)).float(), dim=-1)
    results: list[tuple[float, bool]] = []
    for i, (ids, n) in enumerate(rows):
        if n == 0:
            results.append((0.0, True))
            continue
        targets = torch.tensor(ids[-n:], device=device)
        span = logp[i, len(ids) - 1 - n : len(ids) - 1]
        total = float(span.gather(-1, targets[:, None]).sum())
        results.append((total, bool((span.argmax(-1) == targets).all())))
    return results


def diffusion_scores(
    scorer: Any,
    pairs: list[tuple[list[int], list[int]]],
    max_context: int,
    *,
    samples: int,
    seed: int,
    first_row: int,
) -> list[tuple[float, bool]]:
    """The seeded block-diffusion bound of one batch (rows seeded first_row, first_row + 1, ...)."""
    chunk = []
    for ctx, cont in pairs:
        cont = cont[-(max_context - 1) :]
        chunk.append((ctx[-(max_context - len(cont)) :], cont))
    return diffusion_loglikelihood(
        scorer, chunk, samples=samples, seed=seed, row_ids=range(first_row, first_row + len(chunk))
    )


def batched(items: list[Any], batch_size: int) -> list[tuple[int, list[Any]]]:
    """(first index, items) of consecutive batches."""
    return [(i, items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


def rolling_pairs(ids: list[int], window: int, eod: int) -> list[tuple[list[int], list[int]]]:
    """Non-overlapping windows of a text, each conditioned on the window before it."""
    return [
        (ids[max(0, begin - window) : begin] or [eod], ids[begin : begin + window])
        for begin in range(0, len(ids), window)
    ]


# ----------------------------------------------------------------------------------- generation
def generation_work(
    requests: list[Any], batch_size: int, refill: bool, ranks: int
) -> list[tuple[str, str, list[int]]]:
    """(task, options, request indices) per decoding call. Requests of one task sharing generation
    options are decoded together (each task's decoding cost is its own): in fixed batches of
    `batch_size`, or, refilling, in one call per data-parallel rank (its share of the requests, dealt
    round-robin, decoded with `batch_size` slots)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for index, req in enumerate(requests):
        kwargs = dict(req.args[1]) if len(req.args) > 1 and req.args[1] else {}
        options = json.dumps(kwargs, sort_keys=True, default=str)
        task = getattr(req, "task_name", None) or "generate"
        groups.setdefault((task, options), []).append(index)
    work = []
    for (task, options), indices in groups.items():
        if refill:
            # item k of each group goes to rank k (run_sharded deals items round-robin)
            shares = [indices[rank::ranks] for rank in range(ranks)]
        else:
            shares = [chunk for _, chunk in batched(indices, batch_size)]
        work += [(task, options, share) for share in shares if share]
    return work


def until_strings(kwargs: dict[str, Any]) -> list[str]:
    """The request's stop strings."""
    until = kwargs.get("until") or []
    return [until] if isinstance(until, str) else list(until)


@dataclass
class GenerationSetup:
    """What decoding a share of generation requests needs besides the requests."""

    decoder: Any
    tokenizer: Any
    max_gen_toks: int
    max_context: int
    batch_size: int
    chat_applied: bool


def decode_requests(
    setup: GenerationSetup, requests: list[Any], work: tuple[str, str, list[int]], sampling: Any
) -> tuple[list[str], DecodeStats]:
    """Texts of a share of requests (cut at their stop strings) and the decoding stats."""
    _, options, chunk = work
    kwargs = json.loads(options)
    until = until_strings(kwargs)
    max_new = int(kwargs.get("max_gen_toks", setup.max_gen_toks))
    tok = setup.tokenizer
    prompts, budgets = [], []
    for index in chunk:
        # a chat-templated prompt holds the template's special tokens as text
        ids = tok.encode(requests[index].args[0], allow_special=setup.chat_applied) or [tok.eod]
        room = max(1, min(max_new, setup.max_context - 1))
        ids = ids[-(setup.max_context - room) :]
        prompts.append(ids)
        budgets.append(min(max_new, setup.max_context - len(ids)))

    def stopped(row: int, ids: list[int]) -> bool:
        text = tok.decode(ids, skip_special=True)
        return any(s and s in text for s in until)

    output = setup.decoder.generate(
        prompts,
        stop=stopped if until else None,
        max_new_tokens=max(budgets),
        sampling=sampling,
        row_ids=chunk,  # a request samples the same tokens in any batch and on any rank
        batch_size=setup.batch_size,
    )
    texts = []
    for row in range(len(chunk)):
        text = tok.decode(output.tokens[row][: budgets[row]], skip_special=True)
        for s in until:
            if s:
                text = text.split(s)[0]
        texts.append(text)
    return texts, output.stats


def request_sampling(config: Any, kwargs: dict[str, Any]) -> Any:
    """The decoder's sampling with the request's do_sample / temperature / top_p honoured."""
    if kwargs.get("do_sample") and float(kwargs.get("temperature", 1.0)) > 0:
        return SamplingConfig(
            float(kwargs.get("temperature", 1.0)), float(kwargs.get("top_p", 1.0))
        )
    if "do_sample" in kwargs or "temperature" in kwargs:
        return SamplingConfig()
    return config.sampling


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
            refill: bool = True,
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
            self.refill = refill
            self.last_stats: list[Any] = []
            self.task_stats: dict[str, DecodeStats] = {}  # decoding cost per task
            self.chat_applied = False
            self.mode_announced = False

        # -------------------------------------------------------------- likelihood
        def _score_batch(
            self, first_row: int, pairs: list[tuple[list[int], list[int]]]
        ) -> list[tuple[float, bool]]:
            if self.loglikelihood_mode == "diffusion":
                return diffusion_scores(
                    self.scorer,
                    pairs,
                    self.max_context,
                    samples=self.ll_samples,
                    seed=self.seed,
                    first_row=first_row,
                )
            return causal_scores(self.loaded.model, self.tokenizer.eod, pairs, self.max_context)

        def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            return [r for b in batched(pairs, self.batch_size) for r in self._score_batch(*b)]

        def _announce_mode(self) -> None:
            # said once, and only when a task scores continuations (generation tasks never do)
            if not self.mode_announced and is_main_rank():
                print(f"loglikelihood: {self.loglikelihood_mode}", file=sys.stderr)
            self.mode_announced = True

        def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
            self._announce_mode()
            pairs = [encode_pair(self.tokenizer, *req.args[:2]) for req in requests]
            # under torchrun the batches are dealt over the data-parallel ranks and gathered back
            scored = run_sharded(batched(pairs, self.batch_size), lambda b: self._score_batch(*b))
            return [result for batch in scored for result in batch]

        def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
            self._announce_mode()

            def score(req: Any) -> float:
                ids = self.tokenizer.encode(req.args[0])
                pairs = rolling_pairs(ids, self.max_context, self.tokenizer.eod)
                return sum(total for total, _ in self._score(pairs))

            return run_sharded(requests, score)  # requests dealt over the data-parallel ranks

        # -------------------------------------------------------------- generation
        def generate_until(self, requests: list[Any]) -> list[str]:
            results = [""] * len(requests)
            _, ranks, _ = data_parallel_group()
            work = generation_work(requests, self.batch_size, self.refill, ranks)
            setup = GenerationSetup(
                self.decoder,
                self.tokenizer,
                self.max_gen_toks,
                self.max_context,
                self.batch_size,
                self.chat_applied,
            )

            def decode(item: tuple[str, str, list[int]]) -> Any:
                sampling = request_sampling(self.decoder.config, json.loads(item[1]))
                return decode_requests(setup, requests, item, sampling)

            # under torchrun the work is dealt over the data-parallel ranks and gathered back
            for (task, _, chunk), (texts, stats) in zip(work, run_sharded(work, decode)):
                self.last_stats.append(stats)
                add_stats(self.task_stats.setdefault(task, DecodeStats()), stats)
                for index, text in zip(chunk, texts):
                    results[index] = text
            return results

        # -------------------------------------------------------------- chat template
        @property
        def tokenizer_name(self) -> str:
            return str(getattr(self.tokenizer, "tokenizer_model", "nbdiff")).replace("/", "__")

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return self.tokenizer.chat_template if chat_template else None

        def apply_chat_template(
            self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
        ) -> str:
            """The conversation rendered with the tokenizer's chat template (lm-eval's
            --apply_chat_template; few-shot examples become turns with --fewshot_as_multiturn)."""
            if not self.tokenizer.chat_template:
                raise InferenceError(
                    f"--apply-chat-template: the tokenizer {self.tokenizer_name!r} has no chat "
                    "template; drop the flag or pass --tokenizer with one"
                )
            self.chat_applied = True
            return render_chat(self.tokenizer, chat_history, add_generation_prompt)

    return NBDiffLM


# ----------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of `nbdiff eval`."""
    parser.add_argument(
        "--tasks",
        default=None,
        help="comma-separated lm-eval task names: local ones under --include-path, or lm-eval's own "
        "(gsm8k, ...) when their data is in the HF datasets cache or can be downloaded",
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
        "--thresholds",
        default=None,
        help="comma-separated unmasking thresholds evaluated in one run (e.g. 0.9,0.8,0.7); each "
        "gets its accuracy, TPF, NFE and tokens/s",
    )
    parser.add_argument("--plot", default=None, help="write a PNG of accuracy vs TPF here")
    parser.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="render prompts with the tokenizer's chat template (lm-eval's --apply_chat_template)",
    )
    parser.add_argument(
        "--fewshot-as-multiturn",
        action="store_true",
        help="few-shot examples as conversation turns (needs --apply-chat-template; lm-eval's "
        "--fewshot_as_multiturn)",
    )
    parser.add_argument("--system-instruction", default=None, help="system message of every prompt")
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


@dataclass
class EvalOptions:
    """What `evaluate` passes on to lm_eval.simple_evaluate."""

    limit: float | None = None
    """Examples per task (or a fraction)."""
    num_fewshot: int | None = None
    """Few-shot examples (None: the task's default)."""
    apply_chat_template: bool = False
    """Render prompts with the tokenizer's chat template."""
    fewshot_as_multiturn: bool = False
    """Few-shot examples as conversation turns (with the chat template)."""
    system_instruction: str | None = None
    """System message of every prompt."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvalOptions:
        """The options of `nbdiff eval`'s flags: one per field, named as the field (add_arguments)."""
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})


def task_manager(tasks: list[str], include_path: str | list[str] | None) -> Any:
    """lm-eval's TaskManager over the local task folders, and over lm-eval's own tasks when a task is
    not found locally; InferenceError naming the unknown tasks."""
    from lm_eval.tasks import TaskManager  # optional: lm-eval (checked by _require_lm_eval)

    paths = include_path or None
    manager = TaskManager(include_path=paths, include_defaults=False) if paths else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=paths, include_defaults=True)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise InferenceError(
            f"unknown lm-eval task(s) {', '.join(unknown)}: neither under --include-path "
            f"{include_path or '(none)'} nor among lm-eval's own tasks (`lm-eval ls tasks` lists them)"
        )
    return manager


def evaluate(
    lm: Any,
    tasks: list[str],
    *,
    include_path: str | list[str] | None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    options: EvalOptions | None = None,
) -> dict[str, Any]:
    """lm_eval.simple_evaluate on local tasks, or lm-eval's own ones whose data is available;
    returns its results dict."""
    _require_lm_eval()
    # optional: lm-eval, present here (_require_lm_eval); lm_eval loads its evaluator lazily
    import lm_eval
    import lm_eval.evaluator

    options = options or EvalOptions(limit=limit, num_fewshot=num_fewshot)
    manager = task_manager(tasks, include_path)
    # lm-eval asks `git describe` for the commit of the working directory and lets git print
    # "fatal: not a git repository" outside one; ask the same question quietly.
    with mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", _quiet_git_hash):
        try:
            return lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=manager,
                limit=options.limit,
                num_fewshot=options.num_fewshot,
                log_samples=False,
                bootstrap_iters=0,
                apply_chat_template=options.apply_chat_template,
                fewshot_as_multiturn=options.fewshot_as_multiturn,
                system_instruction=options.system_instruction,
            )
        except (ConnectionError, OSError) as exc:
            # datasets raises these (or subclasses) when a hub data set is neither cached nor
            # downloadable
            raise InferenceError(
                f"the data of lm-eval task(s) {', '.join(tasks)} is not available here ({exc}); "
                "run once where the HF hub is reachable (it is then cached under "
                "~/.cache/huggingface/datasets), or evaluate a local file with --task-jsonl"
            ) from exc


def _quiet_git_hash() -> str | None:
    """The commit of the current directory's git repository, or None (no message on stderr)."""
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


def parse_thresholds(text: str | None) -> list[float | None]:
    """--thresholds 0.9,0.8,0.7 -> [0.9, 0.8, 0.7]; none given -> [None] (the decoder's own)."""
    if not text:
        return [None]
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise InferenceError(
            f"--thresholds takes numbers separated by commas, got {text!r}"
        ) from exc
    if not values:
        raise InferenceError("--thresholds is empty: give e.g. 0.9,0.8,0.7")
    return values


def _scorer(args: argparse.Namespace, loaded: Any, decoder: Any, mode: str) -> Any:
    if mode != "diffusion":
        return None
    if not args.ar:
        return decoder
    block_args = argparse.Namespace(**{**vars(args), "ar": False})
    return build_decoder(block_args, loaded, args.max_gen_toks)


def _evaluate_threshold(
    args: argparse.Namespace,
    loaded: Any,
    threshold: float | None,
    tasks: list[str],
    paths: list[str],
) -> dict[str, Any]:
    """One evaluation at one unmasking threshold: lm-eval's results and per-task decoding cost."""
    run_args = (
        args if threshold is None else argparse.Namespace(**{**vars(args), "threshold": threshold})
    )
    decoder = build_decoder(run_args, loaded, args.max_gen_toks)
    mode = args.loglikelihood or default_loglikelihood(loaded.mask_kind, loaded.ar_weight)
    lm = make_lm_class()(
        loaded,
        decoder,
        batch_size=args.batch_size,
        max_gen_toks=args.max_gen_toks,
        loglikelihood=mode,
        scorer=_scorer(run_args, loaded, decoder, mode),
        ll_samples=args.ll_samples,
        seed=args.seed if args.seed is not None else 0,
        refill=getattr(args, "refill", True),
    )
    options = EvalOptions.from_args(args)
    # lm-eval returns the results on LOCAL_RANK 0 only (the other ranks helped decode)
    results = evaluate(lm, tasks, include_path=paths, options=options) or {}
    return {
        "threshold": threshold,
        "results": results.get("results", {}),
        "decoding": {task: stats_record(s) for task, s in lm.task_stats.items()},
        "configs": results.get("configs", {}),
    }


def _check_eval_args(args: argparse.Namespace) -> None:
    if not args.tasks and not args.task_jsonl:
        raise InferenceError(
            "nothing to evaluate: pass --task-jsonl FILE, --tasks NAMES (lm-eval's own tasks) or "
            "--tasks NAMES --include-path DIR"
        )
    if args.fewshot_as_multiturn and not args.apply_chat_template:
        raise InferenceError("--fewshot-as-multiturn needs --apply-chat-template")
    if args.ll_samples < 1:
        raise InferenceError(f"--ll-samples must be >= 1, got {args.ll_samples}")


def run(args: argparse.Namespace) -> int:
    """`nbdiff eval`."""
    make_lm_class()  # lm-eval installed?
    _check_eval_args(args)
    thresholds = parse_thresholds(args.thresholds)
    with tempfile.TemporaryDirectory(prefix="nbdiff_eval_") as tmp:
        paths: list[str] = [args.include_path] if args.include_path else []
        tasks = [t for t in (args.tasks or "").split(",") if t]
        if args.task_jsonl:
            tasks.append(
                write_gsm8k_style_task(args.task_jsonl, tmp, max_gen_toks=args.max_gen_toks)
            )
            paths.append(tmp)
        loaded = load_model_from_args(args)
        runs = [_evaluate_threshold(args, loaded, t, tasks, paths) for t in thresholds]
    if not is_main_rank():
        return 0
    for line in table_rows(runs):
        print(line)
    if args.plot:
        plot_accuracy_vs_tpf(runs, args.plot)
    if args.output:
        record: dict[str, Any] = {"results": runs[0]["results"], "decoding": runs[0]["decoding"]}
        if args.thresholds:
            record["runs"] = [{k: v for k, v in r.items() if k != "configs"} for r in runs]
        record["configs"] = runs[0]["configs"]
        Path(args.output).write_text(json.dumps(jsonable(record), indent=2, allow_nan=False))
    return 0
