"""The exported HF folder is a complete artifact: its own block-diffusion `generate` (run in a process
that cannot import nbdiff_megatron) gives `nbdiff generate`'s tokens, and plain greedy `generate`
stops at EOS and equals `nbdiff generate --ar`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("transformers")

PROMPTS = [
    "The king said unto",
    "And God",
    "Thou art a man of the people, and the",
    "Yea",
]
SETTINGS = [
    dict(token_shift=True, mask_kind="context_causal", block_align="document"),
    dict(token_shift=False, mask_kind="context_causal", block_align="prompt", threshold=0.5),
    dict(token_shift=True, mask_kind="block_causal", block_align="document", sub_block_size=4),
    dict(token_shift=False, mask_kind="block_causal", block_align="prompt", steps_per_block=4),
]
MAX_NEW = 14

HF_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    sys.modules["nbdiff_megatron"] = None  # this process must not (and cannot) use the package
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder, spec = sys.argv[1], json.loads(sys.argv[2])
    prompts, settings, max_new = spec["prompts"], spec["settings"], spec["max_new"]

    def batch(rows):
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        return ids, mask

    def new_tokens(out, width, eos):
        rows = []
        for row in out[:, width:].tolist():
            cut = next((j for j, t in enumerate(row) if t in eos), None)
            rows.append(row if cut is None else row[:cut])
        return rows

    gen_cfg = GenerationConfig.from_pretrained(folder)
    eos = gen_cfg.eos_token_id if isinstance(gen_cfg.eos_token_id, list) else [gen_cfg.eos_token_id]
    result = {"block": [], "block_single": [], "eos": eos}
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids, mask = batch(prompts)
    for options in settings:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, **options)
        result["block"].append(new_tokens(out, ids.shape[1], eos))
    single = []
    for p in prompts:
        one, one_mask = batch([p])
        out = model.generate(input_ids=one, attention_mask=one_mask, max_new_tokens=max_new,
                             **settings[0])
        single += new_tokens(out, one.shape[1], eos)
    result["block_single"] = single
    # the loop's own input checks: steps that do not divide over the sub-blocks are refused
    try:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                       sub_block_size=4, steps_per_block=3)
        result["refused"] = None
    except ValueError as exc:
        result["refused"] = str(exc)
    # stop reasons are returned (not hung on the function); a budget past the context is announced
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=500,
                              return_dict_in_generate=True, **settings[0])
    result["long_reasons"] = full.stop_reasons
    result["long_nfe"] = full.stats.forward_passes
    result["long"] = full.sequences[:, ids.shape[1]:].tolist()
    result["pad"] = gen_cfg.pad_token_id
    result["warnings"] = [str(w.message) for w in caught]
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False)
    result["ar"] = new_tokens(out, ids.shape[1], eos)
    result["imported"] = sorted(
        m for m, v in sys.modules.items() if m.startswith("nbdiff") and v is not None
    )
    print(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from nbdiff_megatron.convert.mcore_to_hf import mcore_to_hf
    from nbdiff_megatron.data.bundled import bundled_tokenizer_path
    from nbdiff_megatron.data.tokenizer import load_tokenizer
    from nbdiff_megatron.model.builder import build_model
    from nbdiff_megatron.model.config import ModelConfig
    from nbdiff_megatron.training import checkpointing

    tok_path = bundled_tokenizer_path()
    tok = load_tokenizer("HuggingFaceTokenizer", tok_path)
    cfg = ModelConfig(vocab_size=tok.vocab_size, seq_length=64, init_method_std=0.3)
    model = build_model(cfg, seed=5)
    root = tmp_path_factory.mktemp("export")
    train_state = {
        "config": {
            "model": cfg.to_dict(),
            "loss": {"token_shift": True},
            "curriculum": {"target_block_size": 8},
            "data": {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": tok_path},
        },
        "tokenizer": {"type": "HuggingFaceTokenizer", "model": tok_path},
        "block_align": "document",
    }
    checkpointing.save_checkpoint(root / "ckpt", 3, [model], None, train_state)
    mcore_to_hf(root / "ckpt", root / "hf", show_progress=False)
    return root / "ckpt", root / "hf", tok


def test_export_config_is_complete(exported):
    _, hf, tok = exported
    from nbdiff_megatron.data.tokenizer import stop_token_ids

    config = json.loads((hf / "config.json").read_text())
    gen = json.loads((hf / "generation_config.json").read_text())
    eos = stop_token_ids(tok)
    assert config["max_position_embeddings"] == 64  # the trained context, not 2048
    assert config["eos_token_id"] in (eos, eos[0]) and tok.eod in eos
    assert config["eos_token_id"] != tok.mask_id and config["bos_token_id"] == tok.bos
    assert config["pad_token_id"] == tok.pad
    assert gen["eos_token_id"] in (eos, eos[0]) and gen["suppress_tokens"] == [tok.mask_id]
    assert config["nbdiff"]["block_align"] == "document"
    assert (hf / "custom_generate" / "generate.py").is_file()
    card = (hf / "README.md").read_text()
    assert "trust_remote_code=True" in card and "nbdiff generate --ar" in card


def test_trust_remote_code_generate_equals_nbdiff_generate(exported):
    from nbdiff_megatron.inference import ARDecoder, BlockDecoder, DecodeConfig
    from nbdiff_megatron.inference.cli import unmasking_from_args
    from nbdiff_megatron.inference.loading import load_for_inference

    ckpt, hf, tok = exported
    loaded = load_for_inference(ckpt)
    prompts = [tok.encode(p) for p in PROMPTS]
    expected = []
    for options in SETTINGS:
        args = type("A", (), {})()
        args.unmasking, args.threshold, args.tokens_per_step = None, options.get("threshold"), 1
        args.steps_per_block = options.get("steps_per_block")
        config = DecodeConfig(
            block_size=loaded.block_size,
            sub_block_size=options.get("sub_block_size"),
            max_new_tokens=MAX_NEW,
            token_shift=options["token_shift"],
            mask_kind=options["mask_kind"],
            block_align=options["block_align"],
            unmasking=unmasking_from_args(args),
        )
        decoder = BlockDecoder(
            loaded.model, mask_id=loaded.mask_id, eos_ids=loaded.eos_ids, config=config
        )
        expected.append(decoder.generate(prompts).tokens)
    ar = ARDecoder(loaded.model, eos_ids=loaded.eos_ids, mask_id=loaded.mask_id)
    expected_ar = ar.generate(prompts, max_new_tokens=MAX_NEW).tokens
    long = BlockDecoder(
        loaded.model,
        mask_id=loaded.mask_id,
        eos_ids=loaded.eos_ids,
        block_size=loaded.block_size,
        max_new_tokens=500,
        **{k: v for k, v in SETTINGS[0].items()},
    ).generate(prompts)

    spec = {"prompts": prompts, "settings": SETTINGS, "max_new": MAX_NEW}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", HF_SCRIPT, str(hf), json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(hf),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["imported"] == []
    assert sorted(result["eos"]) == sorted(loaded.eos_ids)
    for options, want, got in zip(SETTINGS, expected, result["block"]):
        assert got == want, options
    assert result["block_single"] == expected[0]  # batch 1 == batch 4
    assert result["ar"] == expected_ar
    assert "multiple of the 2 sub-blocks" in result["refused"]
    width = max(len(t) + (e is not None) for t, e in zip(long.tokens, long.eos_tokens))
    for got, want, eos in zip(result["long"], long.tokens, long.eos_tokens):
        want = want + ([eos] if eos is not None else [])
        assert got == want + [result["pad"]] * (width - len(want))
    assert result["long_reasons"] == long.stop_reasons and "context" in long.stop_reasons
    assert result["long_nfe"] == long.stats.forward_passes
    assert any(
        "max_new_tokens=500 does not fit in the context (64 tokens)" in w
        for w in result["warnings"]
    )
