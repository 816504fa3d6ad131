"""SFT: loss mask on responses only, templates, truncation rules, bad conversations, datasets."""

import json

import pytest
import torch

from nbdiff_megatron.data.bundled import bundled_chat_path, bundled_tokenizer_dir
from nbdiff_megatron.data.config import DEFAULT_SFT_TEMPLATE, DataConfig
from nbdiff_megatron.data.datasets import build_datasets
from nbdiff_megatron.data.sft import (
    FIRST_TURN_TOO_LONG,
    TOO_LONG,
    ChatFormatter,
    SFTStats,
    build_sft_datasets,
    load_conversations,
    tokenize_conversations,
)
from nbdiff_megatron.errors import ConfigError, DataError

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Quote Genesis 1:3 <|assistant|>"},
    {"role": "assistant", "content": "And God said, Let there be light."},
    {"role": "user", "content": "Thanks."},
    {"role": "assistant", "content": "Amen."},
]


def _response_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_string_template_masks_responses_only(chat_tokenizer):
    tok = chat_tokenizer
    f = ChatFormatter(tok, DEFAULT_SFT_TEMPLATE)
    ids, mask = f.encode(CONV)
    assert len(ids) == len(mask)
    assert tok.decode(ids) == (
        "<|system|>\nBe brief.\n<|user|>\nQuote Genesis 1:3 <|assistant|>\n<|assistant|>\n"
        "And God said, Let there be light.<|endoftext|><|user|>\nThanks.\n<|assistant|>\n"
        "Amen.<|endoftext|>"
    )
    assert _response_text(tok, ids, mask) == (
        "And God said, Let there be light.<|endoftext|>Amen.<|endoftext|>"
    )
    assert ids.count(tok.eod) == 2 and all(m for i, m in zip(ids, mask) if i == tok.eod)
    # the user's literal "<|assistant|>" stays text: only the template's markers are special
    assistant_id = tok.token_to_id("<|assistant|>")
    assert ids.count(assistant_id) == 2


def test_chat_template_matches_string_template(chat_tokenizer):
    # the bundled folder's chat template renders the same layout as DEFAULT_SFT_TEMPLATE
    conv = [CONV[0], {"role": "user", "content": "Hi"}, *CONV[2:]]
    a = ChatFormatter(chat_tokenizer, "chat_template").encode(conv)
    b = ChatFormatter(chat_tokenizer, DEFAULT_SFT_TEMPLATE).encode(conv)
    assert a == b
    assert ChatFormatter(chat_tokenizer, "auto").template == "chat_template"


def test_chat_template_required_but_absent(tokenizer):
    with pytest.raises(ConfigError, match="has none"):
        ChatFormatter(tokenizer, "chat_template")
    assert ChatFormatter(tokenizer, "auto").template == DEFAULT_SFT_TEMPLATE


def test_bad_conversations_are_counted_with_locations(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [
        json.dumps({"messages": CONV}),
        "{broken",
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
        json.dumps({"messages": [{"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        json.dumps({"text": "not a chat"}),
        "",
    ]
    path.write_text("\n".join(rows) + "\n")
    stats = SFTStats()
    convs = load_conversations([str(path)], stats)
    assert [loc for loc, _ in convs] == [f"{path}:1"]
    assert stats.conversations == 7
    assert dict(stats.skipped) == {"malformed JSON": 1, "bad conversation": 4, "empty line": 1}
    assert [p.location for p in stats.problems] == [f"{path}:{i}" for i in range(2, 8)]
    # The report (printed by the run) names each dropped line and why, as preprocess does.
    report = stats.format()
    assert "  dropped (bad conversation): 4" in report
    assert (
        f"    {path}:3: bad conversation (" in report and f"    {path}:2: malformed JSON" in report
    )
    many = SFTStats()
    for i in range(12):
        many.skip("empty line", f"{path}:{i}")
    assert many.format().count(": empty line") == 10 and "... and 2 more" in many.format()


def test_truncation_rules(chat_tokenizer):
    f = ChatFormatter(chat_tokenizer, DEFAULT_SFT_TEMPLATE)
    long_conv = [
        ("a:1", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 60}])
    ]
    full_len = len(f.encode(long_conv[0][1])[0])
    stats = SFTStats()
    assert tokenize_conversations(long_conv, f, 32, "drop", stats) == []
    assert stats.skipped[TOO_LONG] == 1 and stats.dropped == 1
    stats = SFTStats()
    ((ids, mask),) = tokenize_conversations(long_conv, f, 32, "truncate", stats)
    assert len(ids) == 32 < full_len and mask.any() and stats.truncated == 1
    stats = SFTStats()
    assert tokenize_conversations(long_conv, f, 5, "truncate", stats) == []
    assert stats.skipped["no response token left after truncation"] == 1


def test_truncate_turns_keeps_whole_first_exchanges(chat_tokenizer):
    f = ChatFormatter(chat_tokenizer, DEFAULT_SFT_TEMPLATE)
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "And?"},
        {"role": "assistant", "content": "word " * 60},
    ]
    first = f.encode(turns[:3])
    assert len(first[0]) <= 32 < len(f.encode(turns)[0])
    stats = SFTStats()
    ((ids, mask),) = tokenize_conversations([("a:1", turns)], f, 32, "truncate_turns", stats)
    # exactly the first exchange, with its own end marker: no response cut mid-way
    assert ids.tolist() == first[0] and mask.tolist() == first[1]
    assert stats.used == 1 and stats.truncated == 1 and stats.dropped == 0
    # a conversation whose first exchange alone is too long is dropped, with that reason
    stats = SFTStats()
    assert tokenize_conversations([("a:2", turns[1:3])], f, 4, "truncate_turns", stats) == []
    assert stats.skipped[FIRST_TURN_TOO_LONG] == 1
    assert "dropped (first exchange alone longer than model.seq_length): 1" in stats.format()


def test_sft_datasets_from_bundled_chat(chat_tokenizer):
    cfg = DataConfig(
        mode="sft",
        sft_data_path=[bundled_chat_path()],
        tokenizer_model=bundled_tokenizer_dir(),
        sft_valid_fraction=0.1,
    )
    stats = SFTStats()
    train, valid, test = build_sft_datasets(cfg, 256, chat_tokenizer, (None, None, None), 3, stats)
    assert test is None and stats.conversations == stats.used == 120
    assert stats.sequences == train.num_sequences + valid.num_sequences
    seen_docs = 0
    for ds in (train, valid):
        for i in range(len(ds)):
            s = ds[i]
            assert s["tokens"].shape == s["doc_ids"].shape == s["loss_mask"].shape == (256,)
            d = s["doc_ids"]
            assert d[0] == 0 and bool((d[1:] >= d[:-1]).all())
            # every response token is inside a real document, never padding
            pad_doc = s["tokens"] == chat_tokenizer.pad
            assert not bool((s["loss_mask"] & pad_doc).any())
            seen_docs += int((s["tokens"] == chat_tokenizer.token_to_id("<|user|>")).sum() > 0)
    assert seen_docs == stats.sequences
    # asking for more samples than sequences repeats epochs, each a fresh deterministic order
    more = build_sft_datasets(cfg, 256, chat_tokenizer, (3 * train.num_sequences, 1, None), 3)[0]
    assert len(more) == 3 * train.num_sequences
    rows = [tuple(more[i]["tokens"].tolist()) for i in range(len(more))]
    assert rows[: train.num_sequences] != rows[train.num_sequences : 2 * train.num_sequences]
    assert sorted(rows[: train.num_sequences]) == sorted(
        rows[train.num_sequences : 2 * train.num_sequences]
    )
    again = build_sft_datasets(cfg, 256, chat_tokenizer, (None, None, None), 3)[0]
    assert torch.equal(again[0]["tokens"], train[0]["tokens"])


def test_build_datasets_dispatches_sft(chat_tokenizer, tmp_path):
    cfg = DataConfig(
        mode="sft", sft_data_path=[bundled_chat_path()], tokenizer_model=bundled_tokenizer_dir()
    )
    train, valid, test = build_datasets(cfg, 128, chat_tokenizer, (10, 2, None))
    assert len(train) == 10 and len(valid) == 2 and test is None
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "user", "content": "?"}]}) + "\n")
    cfg = DataConfig(
        mode="sft", sft_data_path=[str(empty)], tokenizer_model=bundled_tokenizer_dir()
    )
    with pytest.raises(DataError, match="no usable conversation"):
        build_datasets(cfg, 128, chat_tokenizer, (1, 1, None))
