"""Pretraining samples from megatron-core's GPTDataset: tokens, document ids, loss mask, loader."""

import numpy as np
import pytest
import torch

from nbdiff_megatron.data.bundled import bundled_tokenizer_path
from nbdiff_megatron.data.config import DataConfig, parse_blend, parse_split
from nbdiff_megatron.data.datasets import build_datasets, doc_ids_from_eod, required_split
from nbdiff_megatron.data.loader import DeterministicSampler, build_dataloader, collate_samples
from nbdiff_megatron.data.packing import doc_ids_from_eod_batch
from nbdiff_megatron.errors import ConfigError, DataError

L = 128


def _config(prefixes, **kw):
    return DataConfig(data_path=prefixes, tokenizer_model=bundled_tokenizer_path(), **kw)


@pytest.fixture(scope="module")
def splits(small_prefix, tokenizer, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    cfg = _config([small_prefix], split="90,8,2", data_cache_path=cache)
    return build_datasets(cfg, L, tokenizer, (300, 20, 5))


def test_doc_ids_from_eod_rule():
    tokens = torch.tensor([[5, 0, 7, 8, 0, 0, 9], [0, 1, 2, 3, 4, 5, 6]])
    expected = torch.tensor([[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]])
    assert torch.equal(doc_ids_from_eod(tokens, 0), expected)
    for backend in ("python", "cpp"):
        assert np.array_equal(doc_ids_from_eod_batch(tokens.numpy(), 0, backend), expected.numpy())


def test_samples_are_x0_with_doc_ids_and_loss_mask(splits, tokenizer):
    train, valid, test = splits
    assert (len(train), len(valid), len(test)) == (300, 20, 5)
    n_multi_doc = 0
    for ds in splits:
        for i in range(len(ds)):
            s = ds[i]
            assert set(s) == {"tokens", "doc_ids", "loss_mask"}
            assert s["tokens"].shape == s["doc_ids"].shape == s["loss_mask"].shape == (L,)
            assert s["tokens"].dtype == s["doc_ids"].dtype == torch.long
            assert s["loss_mask"].dtype == torch.bool and bool(s["loss_mask"].all())
            d = s["doc_ids"]
            assert d[0] == 0 and bool((d[1:] - d[:-1] >= 0).all())
            assert torch.equal(d, doc_ids_from_eod(s["tokens"], tokenizer.eod))
            assert int(s["tokens"].max()) < tokenizer.vocab_size
            n_multi_doc += int(d[-1] > 0)
    assert n_multi_doc > 0  # samples do cross document boundaries in this corpus


def test_tokens_equal_megatron_gpt_dataset_tokens(splits):
    train = splits[0]
    for i in (0, 7, 299):
        raw = train.megatron_dataset[i]
        assert torch.equal(train[i]["tokens"], raw["tokens"][:L])
        assert raw["tokens"].shape[0] == L  # megatron drew L + 1 tokens and kept L as tokens


def test_every_sample_is_a_slice_of_the_document_stream(splits, small_prefix, tokenizer):
    from nbdiff_megatron.data.megatron_io import IndexedDataset

    ds = IndexedDataset(small_prefix)
    docs = {tuple(ds[i].tolist()) for i in range(len(ds))}
    train = splits[0]
    for i in range(0, 300, 37):
        s = train[i]
        pieces = [s["tokens"][s["doc_ids"] == k].tolist() for k in range(int(s["doc_ids"][-1]) + 1)]
        # inner pieces are whole documents (ending in EOD); the ends are parts of documents
        for piece in pieces[1:-1]:
            assert tuple(piece) in docs
        for piece in pieces[:-1]:
            assert piece[-1] == tokenizer.eod


def test_same_seed_same_samples_other_seed_differs(small_prefix, tokenizer, tmp_path):
    cfg = _config([small_prefix], split="90,8,2", data_cache_path=str(tmp_path))
    a = build_datasets(cfg, L, tokenizer, (50, 5, 5))[0]
    b = build_datasets(cfg, L, tokenizer, (50, 5, 5))[0]
    c = build_datasets(cfg, L, tokenizer, (50, 5, 5), seed=99)[0]
    assert all(torch.equal(a[i]["tokens"], b[i]["tokens"]) for i in range(50))
    assert not all(torch.equal(a[i]["tokens"], c[i]["tokens"]) for i in range(50))


def test_weighted_blend(small_prefix, tokenizer, tmp_path):
    cfg = _config(
        [f"0.3 {small_prefix} 0.7 {small_prefix}"], split="90,8,2", data_cache_path=str(tmp_path)
    )
    train, valid, test = build_datasets(cfg, L, tokenizer, (100, 10, 4))
    assert (len(train), len(valid), len(test)) == (100, 10, 4)
    ids = [int(train.megatron_dataset[i]["dataset_id"]) for i in range(100)]
    assert 20 <= ids.count(0) <= 40
    assert torch.equal(train[5]["doc_ids"], doc_ids_from_eod(train[5]["tokens"], tokenizer.eod))


def test_zero_weight_split_is_none(small_prefix, tokenizer, tmp_path):
    cfg = _config([small_prefix], split="98,2,0", data_cache_path=str(tmp_path))
    train, valid, test = build_datasets(cfg, L, tokenizer, (10, 2, None))
    assert len(train) == 10 and len(valid) == 2 and test is None


def test_missing_prefix_and_tokenizer_mismatch(small_prefix, tmp_path, sample_texts):
    from nbdiff_megatron.data.tokenizer import load_tokenizer

    with pytest.raises(DataError, match="does not exist"):
        build_datasets(_config([str(tmp_path / "nope")]), L, None, (1, 1, 1))
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(
        sample_texts[:5],
        trainer=trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False
        ),
    )
    tok.save(str(tmp_path / "other.json"))
    other = load_tokenizer("HuggingFaceTokenizer", str(tmp_path / "other.json"))
    with pytest.raises(DataError, match="vocab_size=4096"):
        build_datasets(_config([small_prefix]), L, other, (1, 1, 1))


def test_data_config_validation():
    tok = bundled_tokenizer_path()
    DataConfig()  # a section default: complete it, then validate()
    with pytest.raises(ConfigError, match="data_path is empty"):
        DataConfig(tokenizer_model=tok).validate()
    with pytest.raises(ConfigError, match="mode"):
        DataConfig(data_path=["p"], tokenizer_model=tok, mode="rl")
    with pytest.raises(ConfigError, match="weight prefix"):
        DataConfig(data_path=["0.5 a 0.5"], tokenizer_model=tok)
    with pytest.raises(ConfigError, match="mixes"):
        DataConfig(data_path=["a 0.5 b"], tokenizer_model=tok)
    with pytest.raises(ConfigError, match="split"):
        DataConfig(data_path=["a"], tokenizer_model=tok, split="a,b")
    with pytest.raises(ConfigError, match="tokenizer_type"):
        DataConfig(data_path=["a"], tokenizer_model=tok, tokenizer_type="bert")
    with pytest.raises(ConfigError, match="tokenizer_model"):
        DataConfig(data_path=["a"]).validate()
    with pytest.raises(ConfigError, match="sft_data_path"):
        DataConfig(mode="sft", tokenizer_model=tok).validate()
    with pytest.raises(ConfigError, match="tokenizer_model"):
        build_datasets(DataConfig(data_path=["a"]), L, None, (1, 1, 1))
    with pytest.raises(ConfigError, match="sft_template"):
        DataConfig(mode="sft", sft_data_path=["c"], tokenizer_model=tok, sft_template="{x}")
    with pytest.raises(ConfigError, match="sft_overflow"):
        DataConfig(mode="sft", sft_data_path=["c"], tokenizer_model=tok, sft_overflow="cut")
    cfg = DataConfig(data_path="0.25 a 0.75 b", tokenizer_model=tok, tokenizer_type="hf")
    assert cfg.tokenizer_type == "HuggingFaceTokenizer"
    assert parse_blend(cfg.data_path) == (["a", "b"], [0.25, 0.75])
    assert parse_blend(["a", "b c"]) == (["a", "b", "c"], None)
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])


def test_sampler_resume_and_data_parallel_sharding():
    order = [list(b) for b in DeterministicSampler(20, 0, micro_batch_size=2, data_parallel_size=1)]
    assert [i for b in order for i in b] == list(range(20))
    resumed = [list(b) for b in DeterministicSampler(20, 8, micro_batch_size=2)]
    assert resumed == order[4:]
    shards = [
        list(DeterministicSampler(20, 4, 2, data_parallel_rank=r, data_parallel_size=2))
        for r in range(2)
    ]
    assert shards[0][0] == [4, 5] and shards[1][0] == [6, 7]
    merged = sorted(i for shard in shards for b in shard for i in b)
    assert merged == list(range(4, 20))
    cyc = iter(DeterministicSampler(5, 0, 2, cyclic=True))
    assert [next(cyc) for _ in range(3)] == [[0, 1], [2, 3], [4, 0]]
    # A position that is not a multiple of the micro-batch (a resume with another micro-batch
    # size) starts exactly there: the global order is the same.
    assert [list(b) for b in DeterministicSampler(20, 3, 2)][:2] == [[3, 4], [5, 6]]
    with pytest.raises(ConfigError, match=">= 0"):
        DeterministicSampler(20, -1, 2)


def test_dataloader_resumes_exactly(splits):
    train = splits[0]
    full = [b["tokens"] for b in build_dataloader(train, micro_batch_size=4)]
    assert len(full) == 75 and full[0].shape == (4, L)
    resumed = [
        b["tokens"] for b in build_dataloader(train, micro_batch_size=4, consumed_samples=40)
    ]
    assert all(torch.equal(a, b) for a, b in zip(full[10:], resumed))
    batch = collate_samples([train[0], train[1]])
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "tokens": (2, L),
        "doc_ids": (2, L),
        "loss_mask": (2, L),
    }


def test_dataloader_leaves_the_global_rng_alone(splits):
    # A resumed run restores the global RNG (dropout) and then builds its loader: iterating the
    # loader must not shift that RNG, or the resumed steps would differ from an uninterrupted run.
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    loader = iter(build_dataloader(splits[0], micro_batch_size=2, cyclic=True))
    next(loader)
    assert torch.equal(torch.rand(4), expected)


def test_required_split_refuses_a_missing_or_empty_split_naming_it_and_the_fix():
    train, empty = [1, 2], []
    assert required_split((train, empty, None), "training", "fix it") is train
    with pytest.raises(DataError, match=r"the validation split is empty: give it a weight$"):
        required_split((train, empty, None), "validation", "give it a weight")
    with pytest.raises(DataError, match=r"the test split is empty"):
        required_split((train, empty, None), "test", "give it a weight")
