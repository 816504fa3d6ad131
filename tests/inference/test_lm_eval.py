"""`nbdiff eval` through lm-evaluation-harness on the shipped GSM8K-style JSONL; the AR log-likelihood."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).parent / "assets"

lm_eval = pytest.importorskip(
    "lm_eval", reason="the optional extra `eval` (lm-eval) is not installed"
)


@pytest.fixture(scope="module")
def loaded():
    from nbdiff_megatron.data.bundled import bundled_tokenizer_path
    from nbdiff_megatron.data.tokenizer import load_tokenizer, stop_token_ids
    from nbdiff_megatron.inference.loading import LoadedModel
    from nbdiff_megatron.model.builder import build_model
    from nbdiff_megatron.model.config import ModelConfig

    tok = load_tokenizer("HuggingFaceTokenizer", bundled_tokenizer_path())
    cfg = ModelConfig(vocab_size=tok.vocab_size, seq_length=96, init_method_std=0.3)
    model = build_model(cfg, seed=4)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tok,
        model_config=cfg,
        mask_id=tok.mask_id,
        eos_ids=stop_token_ids(tok),
        block_size=8,
    )


@pytest.fixture(scope="module")
def lm(loaded):
    from nbdiff_megatron.inference import BlockDecoder
    from nbdiff_megatron.inference.lm_eval_adapter import make_lm_class

    decoder = BlockDecoder(
        loaded.model, mask_id=loaded.mask_id, eos_ids=loaded.eos_ids, block_size=8
    )
    return make_lm_class()(loaded, decoder, batch_size=4, max_gen_toks=16)


class Request:
    def __init__(self, *args):
        self.args = args


def test_loglikelihood_is_the_causal_log_probability(lm, loaded):
    from nbdiff_megatron.model.builder import ar_forward

    tok = loaded.tokenizer
    pairs = [("And God said", " Let there be light"), ("In the beginning", " was"), ("", "Amen")]
    got = lm.loglikelihood([Request(c, x) for c, x in pairs])
    for (context, continuation), (score, greedy) in zip(pairs, got):
        ctx = tok.encode(context) if context else [tok.eod]
        cont = tok.encode(continuation)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(ar_forward(loaded.model, ids).float(), -1)[0]
        expected = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert score == pytest.approx(expected, abs=1e-4)
        assert isinstance(greedy, bool)
    rolling = lm.loglikelihood_rolling([Request("And God said Let there be light")])
    assert rolling[0] < 0


def test_scoring_is_dealt_over_data_parallel_ranks(lm, monkeypatch):
    """Issue 24: log-likelihood batches (and rolling texts) go through run_sharded, which deals them
    over the data-parallel ranks; here a 2-rank deal is simulated (each rank's share scored on its
    own, rank 1 first) and the gathered scores equal the one-rank scores, in the requests' order."""
    from nbdiff_megatron.inference import lm_eval_adapter

    pairs = [("And God said", " Let"), ("In the", " beginning"), ("Thou", " art"), ("", "Amen")]
    pairs += [("He said", " unto them"), ("And the", " evening")]
    requests = [Request(c, x) for c, x in pairs]
    one_rank = lm.loglikelihood(requests)
    rolling_one = lm.loglikelihood_rolling(requests[:3])
    dealt: list[int] = []

    def two_ranks(work, score):
        dealt.append(len(work))
        shares = {rank: {i: score(work[i]) for i in range(rank, len(work), 2)} for rank in (1, 0)}
        return [shares[i % 2][i] for i in range(len(work))]

    monkeypatch.setattr(lm_eval_adapter, "run_sharded", two_ranks)
    assert lm.loglikelihood(requests) == one_rank
    assert lm.loglikelihood_rolling(requests[:3]) == rolling_one
    assert dealt == [2, 3]  # 6 requests in batches of 4, then 3 rolling texts


def test_generate_until_cuts_at_stop_strings(lm):
    texts = lm.generate_until(
        [
            Request("Question: 2 + 2?\nAnswer:", {"until": ["\n"], "max_gen_toks": 12}),
            Request("The king", {"until": ["xyz"], "max_gen_toks": 10}),
        ]
    )
    assert len(texts) == 2 and "\n" not in texts[0]


def test_eval_on_local_gsm8k_jsonl(lm, tmp_path):
    from nbdiff_megatron.inference.lm_eval_adapter import evaluate, write_gsm8k_style_task

    name = write_gsm8k_style_task(ASSETS / "gsm8k_mini.jsonl", tmp_path, max_gen_toks=16)
    results = evaluate(lm, [name], include_path=str(tmp_path), limit=4)
    metrics = results["results"][name]
    assert "exact_match,strict-match" in metrics
    assert 0.0 <= metrics["exact_match,strict-match"] <= 1.0
    assert (
        len([json.loads(x) for x in (ASSETS / "gsm8k_mini.jsonl").read_text().splitlines()]) == 20
    )


def test_eval_results_are_valid_json_with_configs_as_a_mapping() -> None:
    import math

    from nbdiff_megatron.inference.lm_eval_adapter import jsonable

    record = {
        "results": {"t": {"exact_match": 0.5, "stderr": math.nan}},
        "configs": {"t": {"process_results": len, "num_fewshot": 0, "tags": ("a",)}},
    }
    text = json.dumps(jsonable(record), allow_nan=False)
    back = json.loads(text)
    assert back["configs"]["t"]["num_fewshot"] == 0 and back["configs"]["t"]["tags"] == ["a"]
    assert (
        back["results"]["t"]["stderr"] is None and "len" in back["configs"]["t"]["process_results"]
    )


def test_diffusion_loglikelihood_mode(loaded):
    from nbdiff_megatron.errors import InferenceError
    from nbdiff_megatron.inference import BlockDecoder
    from nbdiff_megatron.inference.likelihood import diffusion_loglikelihood
    from nbdiff_megatron.inference.lm_eval_adapter import encode_pair, make_lm_class

    decoder = BlockDecoder(
        loaded.model, mask_id=loaded.mask_id, eos_ids=loaded.eos_ids, block_size=8
    )
    lm = make_lm_class()(
        loaded, decoder, batch_size=2, loglikelihood="diffusion", scorer=decoder, ll_samples=2
    )
    pairs = [("And God said", " Let there be light"), ("In the beginning", " was")]
    got = lm.loglikelihood([Request(c, x) for c, x in pairs])
    encoded = [encode_pair(lm.tokenizer, c, x) for c, x in pairs]
    expected = diffusion_loglikelihood(decoder, encoded, samples=2, seed=0)
    assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], abs=1e-6)
    assert all(score < 0 for score, _ in got)
    with pytest.raises(InferenceError, match="loglikelihood"):
        make_lm_class()(loaded, decoder, loglikelihood="elbo")
