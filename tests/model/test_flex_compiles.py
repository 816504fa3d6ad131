"""Compiled FlexAttention never falls back to its unfused form in a shipped command.

torch runs a compiled function uncompiled once it holds `recompile_limit` versions (default 8), and
uncompiled flex materialises the full score matrix (an OOM at 8K). These tests replay the flex call
sequences of `nbdiff ablate` and of `nbdiff eval`'s causal scorer through the real attention module
and mask builders, compiled with a counting backend on CPU (forward only: flex has no backward on
CPU; grad mode is toggled as the training forwards toggle it), and count the compiled versions.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
import torch._dynamo
from megatron.core.transformer.transformer_config import TransformerConfig

from nbdiff_megatron.ablation import VARIANT_SPECS, VARIANTS
from nbdiff_megatron.method.masks import annealed_draw
from nbdiff_megatron.model import attention
from nbdiff_megatron.model.attention import (
    DEFAULT_FLEX_RECOMPILE_LIMIT,
    FLEX_COMPILE_BACKEND_ENV,
    FLEX_RECOMPILE_LIMIT_ENV,
    FlexRecompileLimitError,
    NBDiffAttention,
    reset_compiled_flex,
)
from nbdiff_megatron.model.builder import ar_model_inputs, nbdiff_model_inputs

COUNTING_BACKEND = "nbdiff_test_count_flex_compiles"
HEADS, GROUPS, HEAD_DIM = 4, 2, 8
L, TARGET_BLOCK, MICRO_BATCH, EVAL_BATCH = 32, 8, 2, 16

compiled_versions: Counter[str] = Counter()


def _count_versions(graph_module: torch.fx.GraphModule, example_inputs: list) -> object:
    """A torch.compile backend that counts each compiled graph (one per version: fullgraph)."""
    targets = " ".join(str(node.target) for node in graph_module.graph.nodes)
    compiled_versions["attention" if "flex_attention" in targets else "block_mask"] += 1
    return graph_module.forward


@pytest.fixture
def counting(monkeypatch):
    """Flex compiled on CPU with the counting backend, from empty compile caches."""
    if COUNTING_BACKEND not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(_count_versions, name=COUNTING_BACKEND)
    monkeypatch.setenv(FLEX_COMPILE_BACKEND_ENV, COUNTING_BACKEND)
    torch._dynamo.reset()
    reset_compiled_flex()
    compiled_versions.clear()
    global_limit = torch._dynamo.config.recompile_limit
    yield compiled_versions
    # Our limit is the compiled callable's own: torch's global configuration is never changed.
    assert torch._dynamo.config.recompile_limit == global_limit
    assert not torch._dynamo.config.fail_on_recompile_limit_hit
    reset_compiled_flex()
    torch._dynamo.reset()


def _module() -> NBDiffAttention:
    config = TransformerConfig(
        num_layers=1,
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        kv_channels=HEAD_DIM,
        attention_dropout=0.0,
        use_cpu_initialization=True,
    )
    return NBDiffAttention(config, layer_number=1).eval()


def _attend(module: NBDiffAttention, inputs, *, grad: bool) -> torch.Tensor:
    """One core-attention call on the inputs' mask, q/k/v shaped as megatron hands them over."""
    batch, length = inputs.input_ids.shape
    q = torch.randn(length, batch, HEADS, HEAD_DIM)
    k, v = torch.randn(2, length, batch, GROUPS, HEAD_DIM)
    with torch.set_grad_enabled(grad):
        return module(q, k, v, inputs.attention_mask)


def _training_forwards(module: NBDiffAttention, kind: str, block_sizes: list[int]) -> None:
    """Micro-batches of one training run (training/batches.py): packed data always carries doc_ids,
    the annealed kind a fresh draw per micro-batch; full recomputation (ablation_8k.yaml) runs each
    layer's forward under no_grad, then again with grad in the backward."""
    gen = torch.Generator().manual_seed(0)
    for step, block in enumerate(block_sizes):
        x0 = torch.randint(0, 50, (MICRO_BATCH, L), generator=gen)
        doc_ids = (torch.arange(L) >= L // 3).long().expand(MICRO_BATCH, L)
        draw = None
        if kind == "annealed":
            progress = step / max(1, len(block_sizes) - 1)
            draw = annealed_draw(MICRO_BATCH, L, block, progress, generator=gen)
        inputs = nbdiff_model_inputs(
            x0, x0, block_size=block, kind=kind, doc_ids=doc_ids, backend="flex", annealed_draw=draw
        )
        _attend(module, inputs, grad=False)
        _attend(module, inputs, grad=True)


def _evaluation_forwards(module: NBDiffAttention, kind: str, samples: int) -> None:
    """ablation.evaluate: held-out chunks of 16 (the last one shorter) under no_grad, an NBDiff
    forward at the target block size and a causal forward on x_0 each."""
    for start in range(0, samples, EVAL_BATCH):
        batch = min(EVAL_BATCH, samples - start)
        x0 = torch.randint(0, 50, (batch, L))
        doc_ids = (torch.arange(L) >= L // 2).long().expand(batch, L)
        with torch.no_grad():
            trained = "block_causal" if kind == "block_causal" else "context_causal"
            inputs = nbdiff_model_inputs(
                x0, x0, block_size=TARGET_BLOCK, kind=trained, doc_ids=doc_ids, backend="flex"
            )
            _attend(module, inputs, grad=False)
            _attend(module, ar_model_inputs(x0, doc_ids=doc_ids, backend="flex"), grad=False)


def _growth(grows: bool) -> list[int]:
    if not grows:
        return [TARGET_BLOCK] * 2
    sizes = [1]
    while sizes[-1] < TARGET_BLOCK:
        sizes.append(sizes[-1] * 2)
    return sizes


def test_ablate_call_sequence_stays_compiled(counting) -> None:
    module = _module()
    # AR start (trained first when no --ar-checkpoint is given): context-causal at B = 1.
    _training_forwards(module, "context_causal", [1, 1])
    for name in VARIANTS:
        spec = VARIANT_SPECS[name]
        _training_forwards(module, spec.mask_kind, _growth(spec.grows))
    after_training = counting["attention"]
    # Evaluation of the AR start, then of every variant, in the same process (held-out set of 20).
    _evaluation_forwards(module, "context_causal", 20)
    for name in VARIANTS:
        _evaluation_forwards(module, VARIANT_SPECS[name].mask_kind, 20)
    # Three mask kinds x two grad modes in training; the evaluation's new batch sizes compile the
    # batch dimension dynamic (NBDiff, block-causal and causal-on-x_0 mask functions).
    assert after_training == 6, counting
    assert counting["attention"] <= 12, counting
    assert counting["block_mask"] <= 12, counting
    assert max(counting.values()) < DEFAULT_FLEX_RECOMPILE_LIMIT
    # More versions than torch's default limit (8), every one compiled: today's main fell back to
    # unfused flex at the 9th.
    assert counting["attention"] > torch._dynamo.config.recompile_limit, counting


@pytest.mark.parametrize("per_call_patch", [False, True], ids=["compile-option", "config-patch"])
def test_past_the_limit_is_a_loud_error(counting, monkeypatch, per_call_patch) -> None:
    """Past our limit: FlexRecompileLimitError naming the variable, never a silent unfused run.
    config-patch: the path of a torch without torch.compile(recompile_limit=...)."""
    if per_call_patch:
        monkeypatch.setattr(attention, "_compile_takes_recompile_limit", lambda: False)
    monkeypatch.setenv(FLEX_RECOMPILE_LIMIT_ENV, "2")
    module = _module()
    x0 = torch.randint(0, 50, (MICRO_BATCH, L))
    kinds = ("context_causal", "block_causal")
    with torch.no_grad():
        for kind in kinds:
            inputs = nbdiff_model_inputs(x0, x0, block_size=4, kind=kind, backend="flex")
            _attend(module, inputs, grad=False)
        with pytest.raises(FlexRecompileLimitError, match=FLEX_RECOMPILE_LIMIT_ENV):
            _attend(module, ar_model_inputs(x0, backend="flex"), grad=False)
    assert counting["attention"] == 2


def test_recompile_limit_variable_must_be_positive(monkeypatch) -> None:
    from nbdiff_megatron.errors import ConfigError

    monkeypatch.setenv(FLEX_RECOMPILE_LIMIT_ENV, "many")
    with pytest.raises(ConfigError, match=FLEX_RECOMPILE_LIMIT_ENV):
        attention.flex_recompile_limit()


def test_cpu_default_stays_uncompiled(monkeypatch) -> None:
    monkeypatch.delenv(FLEX_COMPILE_BACKEND_ENV, raising=False)
    assert attention.compiled_flex(torch.device("cpu")) is None


# ------------------------------------------------------------------------------- lm-eval scorer
@pytest.fixture(scope="module")
def scorer_lm():
    """NBDiffLM over a tiny fp64 model (max context 96), its causal scorer at batch 3."""
    pytest.importorskip("lm_eval", reason="the optional extra `eval` (lm-eval) is not installed")
    from nbdiff_megatron.data.bundled import bundled_tokenizer_path
    from nbdiff_megatron.data.tokenizer import load_tokenizer, stop_token_ids
    from nbdiff_megatron.inference import ARDecoder
    from nbdiff_megatron.inference.lm_eval_adapter import make_lm_class
    from nbdiff_megatron.inference.loading import LoadedModel
    from nbdiff_megatron.model.builder import build_model
    from nbdiff_megatron.model.config import ModelConfig

    tok = load_tokenizer("HuggingFaceTokenizer", bundled_tokenizer_path())
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        seq_length=96,
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        init_method_std=0.3,
        attention_backend="sdpa",
    )
    # fp64: the bucketed and unbucketed scores compare free of fp32 summation-order noise.
    model = build_model(cfg, seed=3).eval().to(torch.float64)
    loaded = LoadedModel(
        model=model,
        tokenizer=tok,
        model_config=cfg,
        mask_id=tok.mask_id,
        eos_ids=stop_token_ids(tok),
        block_size=8,
    )
    decoder = ARDecoder(model, mask_id=tok.mask_id, eos_ids=loaded.eos_ids, max_new_tokens=4)
    return make_lm_class()(loaded, decoder, batch_size=3)


def _scorer_pairs(count: int = 14) -> list[tuple[list[int], list[int]]]:
    """Context + continuation pairs of many lengths (2 to 100 tokens: some cut to the context)."""
    gen = torch.Generator().manual_seed(7)
    pairs = []
    for i in range(count):
        ctx = torch.randint(5, 200, (1 + 7 * i,), generator=gen).tolist()
        cont = torch.randint(5, 200, (1 + i % 4,), generator=gen).tolist()
        pairs.append((ctx, cont))
    return pairs


def test_causal_scorer_buckets_widths_with_unchanged_scores(scorer_lm, monkeypatch) -> None:
    from nbdiff_megatron.inference import lm_eval_adapter
    from nbdiff_megatron.model import builder

    widths: list[int] = []
    real_forward = builder.ar_forward

    def recording_forward(model, x0, **kwargs):
        widths.append(x0.shape[1])
        return real_forward(model, x0, **kwargs)

    monkeypatch.setattr(builder, "ar_forward", recording_forward)
    pairs = _scorer_pairs()
    bucketed = scorer_lm._score(pairs)
    assert set(widths) <= {16, 32, 64, 96}, widths
    monkeypatch.setattr(lm_eval_adapter, "padded_width", lambda width, max_context: width)
    widths.clear()
    unbucketed = scorer_lm._score(pairs)
    assert len(set(widths)) > 4
    # Right padding under a causal mask: the scored positions see exactly the same keys.
    assert [greedy for _, greedy in bucketed] == [greedy for _, greedy in unbucketed]
    assert [score for score, _ in bucketed] == [score for score, _ in unbucketed]


def test_causal_scorer_stays_compiled_over_many_widths(scorer_lm, counting, monkeypatch) -> None:
    """nbdiff eval's causal scorer with the flex backend (what `auto` picks on CUDA): a few
    versions for every request width and batch size, not one per width."""
    model = scorer_lm.loaded.model
    monkeypatch.setattr(
        model, "nbdiff_config", dataclasses.replace(model.nbdiff_config, attention_backend="flex")
    )
    pairs = _scorer_pairs()
    scorer_lm._score(pairs)
    scorer_lm._score(pairs[:1])  # loglikelihood_rolling scores a few windows at a time
    scorer_lm._score(pairs[5:7])
    # Specialised first (width 32, batch 3), then the sequence and the batch dimension compiled
    # dynamic once each, and batch 1 (torch specialises sizes 0 and 1): at most 4.
    assert 1 <= counting["attention"] <= 4, counting
    assert counting["block_mask"] <= 2, counting
