"""`nbdiff eval` reports what the papers report (issue 24, item 3; issue 25, item 6): accuracy beside
TPF / NFE / tokens/s per task, several thresholds in one run with a plot, chat template and multi-turn
few-shot, data-parallel evaluation under torchrun equal to one rank, malformed task lines listed, hub
tasks whose data is missing refused with a clear message."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import pytest

from nbdiff_megatron.cli import build_parser, main
from nbdiff_megatron.errors import InferenceError

from ..launch import output_tail, run_torchrun

pytest.importorskip("lm_eval", reason="the optional extra `eval` (lm-eval) is not installed")

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    """The bundled GSM8K-style file with two malformed lines added (lines 3 and 5)."""
    lines = (ASSETS / "gsm8k_mini.jsonl").read_text().splitlines()[:4]
    lines.insert(2, json.dumps({"question": "What is 2 + 2?", "answer": "4"}))  # no ####
    lines.insert(4, "{not json")
    path = tmp_path_factory.mktemp("tasks") / "mini.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


MC_TASK = """\
task: mc_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def mc_task(tmp_path_factory):
    """A local multiple-choice task (scored by log-likelihood): 5 questions of 3 choices."""
    folder = tmp_path_factory.mktemp("mc")
    rows = [
        {"question": q, "choices": [" light", " darkness", " water"], "label": i % 3}
        for i, q in enumerate(
            [
                "And God said, Let there be",
                "The earth was without form, and",
                "Thou art",
                "In the beginning God created the",
                "And the evening and the morning were",
            ]
        )
    ]
    (folder / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "mc_local.yaml").write_text(MC_TASK.format(path=folder / "mc.jsonl"))
    return folder


@pytest.fixture(scope="module")
def loaded(trained_checkpoint):
    from nbdiff_megatron.inference.loading import load_for_inference

    return load_for_inference(trained_checkpoint[0])


@pytest.fixture(scope="module")
def one_rank(trained_checkpoint, task_file, mc_task, tmp_path_factory):
    """One `nbdiff eval` of a generation task and a log-likelihood task at two thresholds, with a
    plot; (output JSON, stderr, stdout, folder, arguments)."""
    save, _, _ = trained_checkpoint
    out = tmp_path_factory.mktemp("eval")
    args = ["eval", "--load", str(save), "--task-jsonl", str(task_file), "--max-gen-toks", "8"]
    args += ["--tasks", "mc_local", "--include-path", str(mc_task)]
    args += ["--thresholds", "0.9,0.3", "--output", str(out / "one.json")]
    args += ["--plot", str(out / "plot.png"), "--batch-size", "2"]
    # capsys is function-scoped: capture by hand for a module fixture
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        assert main(args) == 0
    return json.loads((out / "one.json").read_text()), err.getvalue(), std.getvalue(), out, args


def test_eval_reports_tpf_nfe_per_task_and_threshold(one_rank, task_file):
    record, err, out, folder, _ = one_rank
    assert [r["threshold"] for r in record["runs"]] == [0.9, 0.3]
    for run in record["runs"]:
        cost = run["decoding"]["gsm8k_local"]
        assert cost["nfe"] > 0 and cost["tokens"] > 0 and cost["tpf"] > 0
        assert cost["tokens_per_s"] > 0
        assert "exact_match,strict-match" in run["results"]["gsm8k_local"]
    # the looser threshold unmasks more per forward
    tpfs = [r["decoding"]["gsm8k_local"]["tpf"] for r in record["runs"]]
    assert tpfs[1] >= tpfs[0]
    assert record["decoding"] == record["runs"][0]["decoding"]
    assert "threshold 0.9  gsm8k_local: exact_match" in out and "| TPF " in out and "NFE" in out
    assert (folder / "plot.png").stat().st_size > 1000
    # the log-likelihood mode is announced once per run, by the task that scores continuations
    assert err.count("loglikelihood: causal") == 2
    assert "acc,none" in record["runs"][0]["results"]["mc_local"]
    assert "mc_local" not in record["runs"][0]["decoding"]  # scoring decodes nothing
    # malformed lines are counted and listed with file:line and why
    assert "skipped 2 malformed line(s)" in err
    assert f"{task_file}:3: the answer has no '#### <number>'" in err
    assert f"{task_file}:5: not valid JSON" in err


@pytest.mark.multirank
def test_data_parallel_eval_equals_one_rank(one_rank, tmp_path):
    """The same run on 2 gloo ranks: generation requests and log-likelihood batches dealt over the
    ranks, results gathered in order, equal to the one-rank run (one launch: the ranks load the
    model and lm-eval)."""
    record, _, _, _, args = one_rank
    # the first of the one-rank run's thresholds, without the plot (one run: the launch is the cost)
    args = [*args[: args.index("--thresholds")], "--thresholds", "0.9", "--batch-size", "2"]
    args += ["--output", str(tmp_path / "two.json")]
    proc = run_torchrun(["-m", "nbdiff_megatron.cli", *args], timeout=600, check=False)
    assert proc.returncode == 0, output_tail(proc)
    two = json.loads((tmp_path / "two.json").read_text())
    assert len(two["runs"]) == 1
    for a, b in zip(record["runs"], two["runs"]):
        assert a["threshold"] == b["threshold"] == 0.9
        assert a["results"] == b["results"]  # exact match of the generations, acc of the scores
        # every prompt gets the same tokens; the forwards differ (each rank refills its own batch)
        assert a["decoding"]["gsm8k_local"]["tokens"] == b["decoding"]["gsm8k_local"]["tokens"]
        assert b["decoding"]["gsm8k_local"]["nfe"] > 0
    assert proc.stdout.count("gsm8k_local: exact_match") == 1  # printed by rank 0 only
    assert proc.stdout.count("mc_local: acc") == 1


def test_chat_template_and_multiturn_fewshot(loaded, tmp_path):
    from nbdiff_megatron.inference.lm_eval_adapter import (
        EvalOptions,
        evaluate,
        make_lm_class,
        write_gsm8k_style_task,
    )

    tok = copy.copy(loaded.tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    loaded = copy.copy(loaded)
    loaded.tokenizer = tok
    from nbdiff_megatron.inference import BlockDecoder

    decoder = BlockDecoder(
        loaded.model, mask_id=loaded.mask_id, eos_ids=loaded.eos_ids, block_size=8
    )
    lm = make_lm_class()(loaded, decoder, batch_size=2, max_gen_toks=4)
    seen: list[str] = []
    generate = lm.generate_until

    def record(requests):
        seen.extend(r.args[0] for r in requests)
        return generate(requests)

    lm.generate_until = record
    name = write_gsm8k_style_task(ASSETS / "gsm8k_mini.jsonl", tmp_path, max_gen_toks=4)
    options = EvalOptions(
        limit=2, num_fewshot=1, apply_chat_template=True, fewshot_as_multiturn=True
    )
    evaluate(lm, [name], include_path=str(tmp_path), options=options)
    assert len(seen) == 2
    for prompt in seen:
        # the few-shot example is a user turn and an assistant turn, then the question's user turn
        assert prompt.count("<|user|>") == 2 and prompt.count("<|assistant|>") == 2
        assert prompt.endswith("<|assistant|>")


def test_hub_task_without_its_data_says_so(loaded, tmp_path):
    """A task whose data set lives on the HF hub (as lm-eval's own tasks do), offline and uncached:
    one message naming the task and what to do."""
    from nbdiff_megatron.inference.lm_eval_adapter import evaluate, make_lm_class

    (tmp_path / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: nbdiff-test/absent-dataset\noutput_type: generate_until\n"
        "test_split: test\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    from nbdiff_megatron.inference import BlockDecoder

    decoder = BlockDecoder(
        loaded.model, mask_id=loaded.mask_id, eos_ids=loaded.eos_ids, block_size=8
    )
    lm = make_lm_class()(loaded, decoder)
    with pytest.raises(InferenceError, match="data of lm-eval task.*hub_task.*not available"):
        evaluate(lm, ["hub_task"], include_path=str(tmp_path), limit=1)


def test_unknown_task_and_flag_errors(trained_checkpoint, tmp_path, capsys):
    save, _, _ = trained_checkpoint
    base = ["eval", "--load", str(save)]
    assert main(base + ["--tasks", "t", "--fewshot-as-multiturn"]) == 2
    assert "--fewshot-as-multiturn needs --apply-chat-template" in capsys.readouterr().err
    assert main(base + ["--task-jsonl", "x.jsonl", "--thresholds", "0.9,abc"]) == 2
    assert "--thresholds takes numbers" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "no final answer"}\n')
    assert main(base + ["--task-jsonl", str(bad)]) == 2
    assert "no line does" in capsys.readouterr().err


def test_eval_options_are_read_from_the_flags_of_the_same_names():
    """Every EvalOptions field is an `nbdiff eval` flag of its name, with the field's default."""
    from nbdiff_megatron.inference.lm_eval_adapter import EvalOptions

    parser = build_parser("eval")
    assert EvalOptions.from_args(parser.parse_args(["--load", "ckpt"])) == EvalOptions()
    args = parser.parse_args(
        ["--load", "ckpt", "--limit", "0.5", "--num-fewshot", "3", "--apply-chat-template"]
        + ["--fewshot-as-multiturn", "--system-instruction", "Answer briefly."]
    )
    assert EvalOptions.from_args(args) == EvalOptions(
        limit=0.5,
        num_fewshot=3,
        apply_chat_template=True,
        fewshot_as_multiturn=True,
        system_instruction="Answer briefly.",
    )
