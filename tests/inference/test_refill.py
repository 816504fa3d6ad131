"""A full batch (issue 24, item 2): with `batch_size` smaller than the number of prompts, a slot whose
prompt stopped takes the next waiting prompt at the next block boundary; every prompt gets the tokens
and the stop reason it gets decoded alone, in every decoding mode. Also the per-row fallback of a
fused commit whose guess missed in some rows only (item 3), and `generate --input` through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from nbdiff_megatron.inference import ARDecoder, BlockDecoder, SamplingConfig, UnmaskingConfig

VOCAB = 48
MASK_ID = VOCAB - 1
SLOTS = 3
# mixed lengths: shorter than a block, several blocks, one much longer than the others (it reaches
# the 64-token context: stop reason "context"), one a whole number of blocks
PROMPTS = [
    [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
    [20, 21, 22],
    list(range(1, 18)),
    [30, 31, 32, 33, 34, 35, 36, 37],
    [9, 9, *range(10, 46), *range(1, 11)],  # 48 tokens: 16 left to generate
    [41, 2, 17, 8, 8],
    [15],
]
MODES = [
    dict(mask_kind="context_causal", token_shift=True, block_align="document"),
    dict(mask_kind="context_causal", token_shift=False, block_align="prompt"),
    dict(mask_kind="block_causal", token_shift=True, block_align="prompt", sub_block_size=4),
    dict(mask_kind="block_causal", token_shift=False, block_align="document", sub_block_size=4),
    dict(token_shift=True, block_align="prompt", fused_commit=False),
    dict(token_shift=True, sub_block_size=4, unmasking=UnmaskingConfig("static", steps=4)),
    dict(token_shift=True, use_cache=False, unmasking=UnmaskingConfig("confidence", 0.5)),
    dict(token_shift=True, sampling=SamplingConfig(temperature=1.0, top_k=4), seed=7),
]


def _decoder(model, options, eos_ids):
    return BlockDecoder(
        model, mask_id=MASK_ID, eos_ids=eos_ids, block_size=8, max_new_tokens=20, **options
    )


def _check_refill_equals_alone(decoder):
    alone = [decoder.generate([p], row_ids=[i]) for i, p in enumerate(PROMPTS)]
    blocks: list[set[int]] = []
    full = decoder.generate(
        PROMPTS,
        batch_size=SLOTS,
        callback=lambda _, new: blocks.append({i for i, t in enumerate(new) if t}),
    )
    assert full.tokens == [a.tokens[0] for a in alone]
    assert full.stop_reasons == [a.stop_reasons[0] for a in alone]
    assert full.eos_tokens == [a.eos_tokens[0] for a in alone]
    assert full.stats.generated_tokens == sum(a.stats.generated_tokens for a in alone)
    assert all(len(rows) <= SLOTS for rows in blocks)
    # prompts of different fixed batches decode side by side: slots were refilled
    assert any(len({i // SLOTS for i in rows}) > 1 for rows in blocks)
    return full


@pytest.mark.parametrize("options", MODES)
def test_refilled_batch_equals_each_prompt_alone(tiny_model, options):
    free = _decoder(tiny_model, options, []).generate([PROMPTS[0]])
    eos = free.tokens[0][2]  # the first prompt stops early, in its first block; the others later
    full = _check_refill_equals_alone(_decoder(tiny_model, options, [eos]))
    assert full.stop_reasons[0] == "eos" and len(set(full.stop_reasons)) > 1
    if not options.get("token_shift", True) and options.get("fused_commit", True):
        # a refilled row's first step is run for it alone, never counted as a missed guess
        assert full.stats.fused_misses == 0 and full.stats.fused_hits > 0


def test_refill_without_eos_and_with_two_eos_ids(tiny_model):
    full = _check_refill_equals_alone(_decoder(tiny_model, MODES[0], []))
    assert full.stop_reasons[4] == "context" and full.stop_reasons.count("length") == 6
    _check_refill_equals_alone(_decoder(tiny_model, MODES[0], [5, 9]))


def test_ar_decoder_refills_too(tiny_model):
    decoder = ARDecoder(tiny_model, eos_ids=[7], mask_id=MASK_ID, max_new_tokens=6)
    alone = [decoder.generate([p]).tokens[0] for p in PROMPTS]
    assert decoder.generate(PROMPTS, batch_size=2).tokens == alone


def test_refill_keeps_the_column_window_small(tiny_model):
    """The batch's columns are slid to what its live rows use: decoding many prompts through few
    slots does not grow the cache with the number of prompts."""
    decoder = _decoder(tiny_model, MODES[0], [])
    widths = []
    forward = decoder.runner.forward

    def spy(tokens, positions, allowed, **kwargs):
        widths.append(allowed.shape[-1])
        return forward(tokens, positions, allowed, **kwargs)

    decoder.runner.forward = spy
    short = [p[:12] for p in PROMPTS if p] * 3  # 21 prompts, at most 12 + 20 columns each
    decoder.generate(short, batch_size=SLOTS)
    assert max(widths) <= 2 * (12 + 20 + 8)


def test_fused_miss_reruns_only_the_rows_whose_guess_failed(tiny_model):
    """Item 3: when the guessed first token of the next block is wrong in some rows, only those rows
    are run again; the others keep the fused step's logits. Tokens stay the unfused decoder's."""
    decoder = _decoder(tiny_model, dict(token_shift=True), [])
    sizes = []
    forward = decoder.runner.forward

    def spy(tokens, positions, allowed, **kwargs):
        sizes.append(tokens.shape[0])
        return forward(tokens, positions, allowed, **kwargs)

    decoder.runner.forward = spy
    fused = decoder.generate(PROMPTS)
    unfused = decoder.generate(PROMPTS, fused_commit=False)
    assert fused.tokens == unfused.tokens and fused.stop_reasons == unfused.stop_reasons
    assert fused.stats.fused_misses > 0
    # the misses re-ran part of the batch, not all of it
    assert any(0 < n < len(PROMPTS) for n in sizes)
    assert fused.stats.row_forward_passes < unfused.stats.row_forward_passes


def test_batch_size_must_be_positive(tiny_model):
    from nbdiff_megatron.errors import InferenceError

    with pytest.raises(InferenceError, match="batch_size"):
        _decoder(tiny_model, {}, []).generate(PROMPTS, batch_size=0)


def test_generate_input_refills_and_equals_fixed_batches(trained_checkpoint, tmp_path, capsys):
    from nbdiff_megatron.cli import main

    save, _, _ = trained_checkpoint
    texts = ["And God", "Thou art a", "Yea", "In the beginning God created", "Let", "He said"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(texts) + "\n")
    records = {}
    for mode in ("--refill", "--no-refill"):
        out = tmp_path / f"{mode}.jsonl"
        args = ["generate", "--load", str(save), "--input", str(prompts), "--output", str(out)]
        args += ["--max-new-tokens", "12", "--batch-size", "2", "--threshold", "0.5"]
        assert main(args + ([mode] if mode == "--no-refill" else [])) == 0
        records[mode] = [json.loads(line) for line in out.read_text().splitlines()]
        err = capsys.readouterr().err
        # refilling: one decoding call (one stats line); fixed batches: one per batch
        assert err.count("tokens/forward") == (1 if mode == "--refill" else 3)
    assert [r["prompt"] for r in records["--refill"]] == texts
    assert records["--refill"] == records["--no-refill"]


def test_refill_slides_the_cache_columns(tiny_model):
    """KVCache.relocate keeps each column's k/v at its new column."""
    from nbdiff_megatron.inference.kv_cache import KVCache

    cache = KVCache(num_layers=1, capacity=6)
    key = torch.arange(6.0).reshape(6, 1, 1, 1)
    cache.write(0, key, -key)
    cache.length = 6
    cache.relocate(2, 8)
    assert cache.keys[0][:4, 0, 0, 0].tolist() == [2.0, 3.0, 4.0, 5.0]
    assert cache.length == 4 and cache.capacity == 8
    cache.relocate(-3, 10)
    assert cache.keys[0][3:7, 0, 0, 0].tolist() == [2.0, 3.0, 4.0, 5.0]
    assert cache.values[0][3, 0, 0, 0] == -2.0 and cache.length == 7


def test_the_refill_benchmark_runs_and_its_two_modes_agree(tmp_path) -> None:
    """benchmarks/decode_batch.py (BENCHMARKS.md's refill figures) at a toy size: both modes decode
    every prompt to the same tokens, and refilling takes no more forwards than fixed batches."""
    import subprocess
    import sys

    from tests.launch import REPO, clean_env

    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "decode_batch.py"),
            *("--random", "tiny", "--prompts", "6", "--batch-size", "2", "--block-size", "4"),
            *("--max-new-tokens", "12", "--prompt-tokens", "4", "12", "--repeats", "1"),
            *("--json", str(out)),
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["meta"]["outputs_equal"] is True
    fixed, refill = report["rows"]
    assert (fixed["mode"], refill["mode"]) == ("fixed batches", "refill")
    assert fixed["tokens"] == refill["tokens"] > 0
    assert 0 < refill["nfe"] <= fixed["nfe"]
