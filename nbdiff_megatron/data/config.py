"""The data section of a training config: where the tokens come from and how samples are made.

The sequence length is not here: the model config owns it and passes it to `build_datasets`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from nbdiff_megatron.data.tokenizer import canonical_tokenizer_type
from nbdiff_megatron.errors import ConfigError

MODES = ("pretrain", "sft")
SFT_OVERFLOW_RULES = ("drop", "truncate_turns", "truncate")
# One user/assistant exchange; `<eod>` stands for the tokenizer's end-of-document id. Everything
# from `{assistant}` to the end of the template is the response (it carries the loss).
DEFAULT_SFT_TEMPLATE = "<|user|>\n{user}\n<|assistant|>\n{assistant}<eod>"
DEFAULT_SFT_SYSTEM_TEMPLATE = "<|system|>\n{system}\n"


@dataclass
class DataConfig:
    """Data section of a training config (values checked on construction; `validate()` before use)."""

    data_path: list[str] = field(default_factory=list)
    """Indexed-dataset prefixes in Megatron blend syntax: ["w1 prefix1 w2 prefix2"] or plain prefixes."""
    split: str = "969,30,1"
    """Train/valid/test weights over the documents of each prefix (Megatron's --split)."""
    tokenizer_type: str = "HuggingFaceTokenizer"
    """HuggingFaceTokenizer, SentencePieceTokenizer or TikTokenizer (Megatron's spellings accepted)."""
    tokenizer_model: str = ""
    """tokenizer.json, HF tokenizer folder, sentencepiece .model or tiktoken BPE file."""
    data_cache_path: str | None = None
    """Where megatron-core caches its sample indices; default: a `cache` folder beside the data."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the training process)."""
    seed: int = 1234
    """Seed of the document/sample shuffles (megatron-core) and of SFT packing order."""
    mode: str = "pretrain"
    """'pretrain': GPTDataset samples over indexed data; 'sft': packed chat conversations."""
    sft_data_path: list[str] = field(default_factory=list)
    """Chat JSONL files (one {"messages": [{"role", "content"}, ...]} per line; .gz allowed)."""
    sft_template: str = "auto"
    """'auto' (tokenizer's chat template if any, else the default), 'chat_template', or a template
    string with {user} and {assistant} (and <eod>), e.g. DEFAULT_SFT_TEMPLATE."""
    sft_system_template: str = DEFAULT_SFT_SYSTEM_TEMPLATE
    """How a system message is rendered before the first exchange (string templates only)."""
    sft_overflow: str = "drop"
    """Conversations longer than the sequence: 'drop' them; 'truncate_turns': keep their first
    whole user/assistant exchanges that fit (dropped if even the first does not); 'truncate': cut
    at the sequence length (kept only if a response token survives). The run prints the counts."""
    sft_valid_fraction: float = 0.05
    """Fraction of conversations held out for validation (the rest trains; SFT has no test split)."""

    def __post_init__(self) -> None:
        # Values given are checked now; fields that must be filled in are checked by validate(),
        # so that DataConfig() (a section default) can be built and completed later.
        if isinstance(self.data_path, str):
            self.data_path = [self.data_path]
        if isinstance(self.sft_data_path, str):
            self.sft_data_path = [self.sft_data_path]
        if self.mode not in MODES:
            raise ConfigError(f"data.mode must be one of {MODES}, got {self.mode!r}.")
        if self.data_path:
            parse_blend(self.data_path)
        parse_split(self.split)
        self.tokenizer_type = canonical_tokenizer_type(self.tokenizer_type)
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}.")
        if self.sft_overflow not in SFT_OVERFLOW_RULES:
            raise ConfigError(
                f"data.sft_overflow must be one of {SFT_OVERFLOW_RULES}, got {self.sft_overflow!r}."
            )
        if self.sft_template not in ("auto", "chat_template"):
            check_string_template(self.sft_template)
        if "{system}" not in self.sft_system_template:
            raise ConfigError("data.sft_system_template must contain {system}.")
        if not 0.0 <= self.sft_valid_fraction < 1.0:
            raise ConfigError(
                f"data.sft_valid_fraction must be in [0, 1), got {self.sft_valid_fraction}."
            )

    def validate(self) -> None:
        """Check that the fields a run needs are filled in (ConfigError names the field)."""
        self.__post_init__()
        if self.mode == "pretrain" and not self.data_path:
            raise ConfigError(
                "data.data_path is empty; give the prefixes written by `nbdiff preprocess` "
                "(e.g. ['out/corpus_text_document'] or ['0.7 a_text_document 0.3 b_text_document'])."
            )
        if self.mode == "sft" and not self.sft_data_path:
            raise ConfigError(
                "data.mode is 'sft' but data.sft_data_path lists no chat JSONL files."
            )
        if not self.tokenizer_model:
            raise ConfigError(
                "data.tokenizer_model is empty; pass a tokenizer file or folder (the bundled one is "
                "nbdiff_megatron.data.bundled_tokenizer_path())."
            )


def check_string_template(template: str) -> None:
    """A string SFT template holds {user} then {assistant}, once each, and no other field."""
    fields = re.findall(r"\{(\w*)\}", template)
    if sorted(fields) != ["assistant", "user"] or template.index("{user}") > template.index(
        "{assistant}"
    ):
        raise ConfigError(
            f"data.sft_template {template!r} must contain {{user}} then {{assistant}} once each "
            f"(no other fields), e.g. {DEFAULT_SFT_TEMPLATE!r}; or use 'auto' / 'chat_template'."
        )


def parse_blend(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """Megatron blend syntax -> (prefixes, weights or None). Weights need not sum to 1."""
    tokens = " ".join(data_path).split()
    if not tokens:
        raise ConfigError("data.data_path is empty.")

    def is_number(s: str) -> bool:
        try:
            float(s)
        except ValueError:
            return False
        return True

    if not is_number(tokens[0]):
        if any(is_number(t) for t in tokens):
            raise ConfigError(
                f"data.data_path {data_path} mixes weights and prefixes; write 'w1 p1 w2 p2' or "
                "list prefixes only."
            )
        return tokens, None
    if len(tokens) % 2 or not all(is_number(w) for w in tokens[0::2]):
        raise ConfigError(
            f"data.data_path {data_path} is not 'weight prefix' pairs; write 'w1 p1 w2 p2'."
        )
    weights = [float(w) for w in tokens[0::2]]
    if any(w <= 0 for w in weights):
        raise ConfigError(f"data.data_path weights must be > 0, got {weights}.")
    return tokens[1::2], weights


def parse_split(split: str) -> list[float]:
    """'969,30,1' -> normalised [train, valid, test] weights."""
    try:
        parts = [float(p) for p in str(split).replace("/", ",").split(",") if p.strip()]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError(
            f"data.split {split!r} must be up to three non-negative weights such as '969,30,1'."
        )
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]
