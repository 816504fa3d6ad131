"""SFT data: chat JSONL -> tokens + a loss mask on the assistant responses, packed into sequences.

Formatting, either
- a string template (DataConfig.sft_template) holding `{user}` then `{assistant}`, repeated per
  exchange; e.g. "<|user|>\\n{user}\\n<|assistant|>\\n{assistant}<eod>". `<eod>` is the tokenizer's
  end-of-document id. The loss covers `{assistant}` and everything after it in the template (so the
  model learns to stop). A system message goes first through `sft_system_template`. Message
  contents are tokenized with special tokens treated as text (a user cannot forge a role marker);
  the template's own markers are special tokens.
- or the tokenizer's chat template (HF folder with `chat_template`), rendered with jinja2: the loss
  covers, for each assistant message, the text the template adds after the generation prompt.

Conversations are packed into sequences of exactly L tokens by best-fit decreasing (packing.py);
each conversation is one document (its own doc id; attention never crosses it). Each token also gets
a turn id (`turn_ids_from_loss_mask`): 0 from the conversation's start, +1 right after the end of each
response; the training mask lets no token see a later turn (method/masks.py), so a masked token of a
response never sees the next user turn, which inference never has either (docs/METHOD.md §3). The rest of a
sequence is padding: token `pad`, loss off, one more document id. A conversation longer than L is
dropped (`sft_overflow: drop`), cut back to its first whole exchanges that fit (`truncate_turns`), or
cut to L tokens (`truncate`; kept only if a response token survives). Every conversation is counted
in `SFTStats` (kept, truncated, dropped by reason), which the training run prints.
"""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nbdiff_megatron.data.config import DEFAULT_SFT_TEMPLATE, DataConfig, check_string_template
from nbdiff_megatron.data.packing import pack_best_fit_decreasing
from nbdiff_megatron.data.readers import Problem
from nbdiff_megatron.data.tokenizer import Tokenizer
from nbdiff_megatron.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")
EOD_PLACEHOLDER = "<eod>"
MAX_LISTED_PROBLEMS = 10
"""Dropped conversations listed by file:line and reason in SFTStats.format (the rest are counted)."""


@dataclass
class SFTStats:
    """What happened to the conversations on their way into packed sequences."""

    conversations: int = 0
    used: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)
    sequences: int = 0
    tokens: int = 0
    loss_tokens: int = 0

    def skip(self, reason: str, location: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.problems.append(Problem(reason, location, detail))

    @property
    def dropped(self) -> int:
        """Conversations not used, all reasons together."""
        return sum(self.skipped.values())

    def format(self) -> str:
        fill = self.tokens / max(1, self.sequences)
        lines = [
            f"conversations read: {self.conversations}: kept {self.used} (truncated "
            f"{self.truncated}), dropped {self.dropped}",
            f"packed sequences: {self.sequences}, mean real tokens per sequence: {fill:.1f}, "
            f"loss tokens: {self.loss_tokens}",
        ]
        lines += [f"  dropped ({reason}): {n}" for reason, n in sorted(self.skipped.items())]
        # which lines and why, as preprocess lists them
        lines += [f"    {problem}" for problem in self.problems[:MAX_LISTED_PROBLEMS]]
        if len(self.problems) > MAX_LISTED_PROBLEMS:
            lines.append(f"    ... and {len(self.problems) - MAX_LISTED_PROBLEMS} more")
        return "\n".join(lines)


def load_conversations(
    paths: Sequence[str], stats: SFTStats | None = None
) -> list[tuple[str, list]]:
    """(location, messages) of every valid conversation; invalid lines are counted in `stats`."""
    stats = stats if stats is not None else SFTStats()
    out: list[tuple[str, list]] = []
    for path in paths:
        try:
            opener = gzip.open if _is_gzip(path) else open
            with opener(path, "rb") as f:
                lines = f.readlines()
        except (OSError, EOFError) as exc:
            raise DataError(
                f"chat data {path!r} cannot be read ({exc}); check data.sft_data_path."
            ) from exc
        for line_no, raw in enumerate(lines, start=1):
            location = f"{path}:{line_no}"
            stats.conversations += 1
            if not raw.strip():
                stats.skip("empty line", location)
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                stats.skip("invalid UTF-8", location)
                continue
            except json.JSONDecodeError as exc:
                stats.skip("malformed JSON", location, exc.msg)
                continue
            messages = obj.get("messages") if isinstance(obj, dict) else None
            problem = _check_messages(messages)
            if problem:
                stats.skip("bad conversation", location, problem)
                continue
            if _has_lone_surrogate(messages):
                stats.skip(UNTOKENIZABLE, location, "a lone UTF-16 surrogate (e.g. \\ud800)")
                continue
            out.append((location, messages))
    return out


UNTOKENIZABLE = "text that cannot be tokenized"


def _has_lone_surrogate(messages: list) -> bool:
    """True when a message's text holds a lone surrogate (valid JSON, `"\\ud800"`, but no UTF-8
    text: every tokenizer fails on it)."""
    try:
        for message in messages:
            str(message.get("content", "")).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _check_messages(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        return "no 'messages' list"
    for m in messages:
        if (
            not isinstance(m, dict)
            or m.get("role") not in ROLES
            or not isinstance(m.get("content"), str)
        ):
            return f"each message needs a role in {ROLES} and a string content"
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        return "a system message may only come first"
    turns = roles[1:] if roles[0] == "system" else roles
    if not turns or turns[-1] != "assistant":
        return "the conversation must end with an assistant message"
    if any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(turns)):
        return "user and assistant messages must alternate, user first"
    return ""


class ChatFormatter:
    """Turn a conversation into (token ids, loss mask) with a string or the tokenizer's template."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str = "auto",
        system_template: str = "<|system|>\n{system}\n",
    ) -> None:
        self.tokenizer = tokenizer
        self.system_template = system_template
        if template == "auto":
            template = "chat_template" if tokenizer.chat_template else DEFAULT_SFT_TEMPLATE
        if template == "chat_template":
            if not tokenizer.chat_template:
                raise ConfigError(
                    f"data.sft_template is 'chat_template' but tokenizer {tokenizer.tokenizer_model!r} "
                    "has none; give a string template such as "
                    f"{DEFAULT_SFT_TEMPLATE!r}."
                )
            self._jinja = _compile_chat_template(tokenizer.chat_template)
            self.template = "chat_template"
        else:
            check_string_template(template)
            self._jinja = None
            self.template = template
            head, rest = template.split("{user}")
            middle, tail = rest.split("{assistant}")
            self._pieces = [self._literal(p) for p in (head, middle, tail)]
            sys_head, sys_tail = system_template.split("{system}")
            self._sys_pieces = [self._literal(p) for p in (sys_head, sys_tail)]

    def _literal(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(text.split(EOD_PLACEHOLDER)):
            if i:
                ids.append(self.tokenizer.eod)
            if part:
                ids.extend(self.tokenizer.encode(part, allow_special=True))
        return ids

    def encode(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """Token ids and loss mask (True on response tokens) of one valid conversation."""
        if self._jinja is not None:
            return self._encode_chat_template(messages)
        ids: list[int] = []
        mask: list[bool] = []

        def emit(tokens: list[int], loss: bool) -> None:
            ids.extend(tokens)
            mask.extend([loss] * len(tokens))

        head, middle, tail = self._pieces
        turns = messages
        if messages[0]["role"] == "system":
            emit(self._sys_pieces[0], False)
            emit(self.tokenizer.encode(messages[0]["content"]), False)
            emit(self._sys_pieces[1], False)
            turns = messages[1:]
        for user, assistant in zip(turns[0::2], turns[1::2]):
            emit(head, False)
            emit(self.tokenizer.encode(user["content"]), False)
            emit(middle, False)
            emit(self.tokenizer.encode(assistant["content"]), True)
            emit(tail, True)
        return ids, mask

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        tok = self.tokenizer
        return self._jinja.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            eos_token=tok.decode([tok.eod]),
            bos_token=tok.decode([tok.bos]) if tok.bos is not None else "",
        )

    def _encode_chat_template(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        # Render growing prefixes; the loss spans the text each assistant message adds after the
        # generation prompt. A template whose renderings are not prefixes of each other cannot be
        # split this way.
        segments: list[tuple[str, bool]] = []
        done = ""
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                prompt = self._render(messages[:k], add_generation_prompt=True)
                full = self._render(messages[: k + 1], add_generation_prompt=False)
                if not (prompt.startswith(done) and full.startswith(prompt)):
                    raise ConfigError(
                        "the tokenizer's chat template does not render conversations "
                        "prefix-consistently; set data.sft_template to a string template such as "
                        f"{DEFAULT_SFT_TEMPLATE!r}."
                    )
                segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
                done = full
        ids: list[int] = []
        mask: list[bool] = []
        for text, loss in segments:
            if text:
                tokens = self.tokenizer.encode(text, allow_special=True)
                ids.extend(tokens)
                mask.extend([loss] * len(tokens))
        return ids, mask


def _compile_chat_template(source: str):
    # lazy: only a tokenizer's own (jinja) chat template needs jinja2
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


TOO_LONG = "longer than model.seq_length (data.sft_overflow=drop)"
FIRST_TURN_TOO_LONG = "first exchange alone longer than model.seq_length"


def _first_turns_that_fit(
    messages: list[dict], formatter: ChatFormatter, seq_length: int
) -> tuple[list[int], list[bool]] | None:
    """The encoding of the longest prefix of whole exchanges (ending with an assistant message) that
    fits into seq_length tokens, or None when not even the first exchange fits."""
    ends = [k + 1 for k, m in enumerate(messages) if m["role"] == "assistant"]
    for end in reversed(ends[:-1]):
        ids, mask = formatter.encode(messages[:end])
        if len(ids) <= seq_length:
            return ids, mask
    return None


def tokenize_conversations(
    conversations: list[tuple[str, list]],
    formatter: ChatFormatter,
    seq_length: int,
    overflow: str,
    stats: SFTStats,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, loss_mask) per usable conversation, at most seq_length tokens each (rule: module doc)."""
    out = []
    for location, messages in conversations:
        ids, mask = formatter.encode(messages)
        if len(ids) > seq_length:
            if overflow == "drop":
                stats.skip(TOO_LONG, location, f"{len(ids)} tokens")
                continue
            if overflow == "truncate_turns":
                fitted = _first_turns_that_fit(messages, formatter, seq_length)
                if fitted is None:
                    stats.skip(FIRST_TURN_TOO_LONG, location, f"{len(ids)} tokens")
                    continue
                ids, mask = fitted
            else:
                ids, mask = ids[:seq_length], mask[:seq_length]
            if not any(mask):
                stats.skip("no response token left after truncation", location)
                continue
            stats.truncated += 1
        if not any(mask):
            stats.skip("empty response", location)
            continue
        stats.used += 1
        out.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)))
    return out


def turn_ids_from_loss_mask(loss_mask: np.ndarray) -> np.ndarray:
    """Turn id of every token of one conversation: the number of responses ended before it.

    A response is a run of loss tokens; the token right after its last one starts the next turn.
    """
    mask = np.asarray(loss_mask, dtype=bool)
    ends = mask.copy()
    ends[:-1] &= ~mask[1:]  # a loss token whose successor is not a loss token (or the last token)
    return np.cumsum(ends) - ends


def pack_conversations(
    items: list[tuple[np.ndarray, np.ndarray]],
    seq_length: int,
    pad: int,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Pack (ids, mask) items into [num_sequences, seq_length] tokens / doc_ids / loss_mask /
    turn_ids (padding: turn 0 of its own document)."""
    lengths = np.fromiter((len(ids) for ids, _ in items), dtype=np.int64, count=len(items))
    packing = pack_best_fit_decreasing(lengths, seq_length, backend=backend)
    n = packing.num_bins
    tokens = np.full((n, seq_length), pad, dtype=np.int64)
    doc_ids = np.zeros((n, seq_length), dtype=np.int64)
    loss_mask = np.zeros((n, seq_length), dtype=bool)
    turn_ids = np.zeros((n, seq_length), dtype=np.int64)
    for b in range(n):
        pos = 0
        members = packing.bin(b)
        for doc, item in enumerate(members):
            ids, mask = items[item]
            end = pos + len(ids)
            tokens[b, pos:end] = ids
            doc_ids[b, pos:end] = doc
            loss_mask[b, pos:end] = mask
            turn_ids[b, pos:end] = turn_ids_from_loss_mask(mask)
            pos = end
        doc_ids[b, pos:] = len(members)  # padding is one more document, loss off
    return {
        "tokens": torch.from_numpy(tokens),
        "doc_ids": torch.from_numpy(doc_ids),
        "loss_mask": torch.from_numpy(loss_mask),
        "turn_ids": torch.from_numpy(turn_ids),
    }


class PackedSFTDataset(torch.utils.data.Dataset):
    """Packed sequences, `num_samples` long: epochs repeat with a fresh seeded order each."""

    def __init__(self, packed: dict[str, torch.Tensor], num_samples: int | None, seed: int) -> None:
        self.packed = packed
        self.num_sequences = int(packed["tokens"].shape[0])
        if self.num_sequences == 0:
            raise DataError("no conversation fits into a sequence; see the SFT summary.")
        self.length = self.num_sequences if num_samples is None else int(num_samples)
        self.seed = seed
        self._orders: dict[int, np.ndarray] = {}
        self.stats: SFTStats | None = None
        """What happened to the conversations (set on the training split by build_sft_datasets)."""

    def __len__(self) -> int:
        return self.length

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            self._orders[epoch] = rng.permutation(self.num_sequences)
        return self._orders[epoch]

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < self.length:
            raise IndexError(f"sample {idx} out of range [0, {self.length})")
        epoch, within = divmod(int(idx), self.num_sequences)
        row = int(self._order(epoch)[within])
        return {key: value[row].clone() for key, value in self.packed.items()}


def build_sft_datasets(
    config: DataConfig,
    seq_length: int,
    tokenizer: Tokenizer,
    num_samples: Sequence[int | None],
    seed: int,
    stats: SFTStats | None = None,
) -> tuple[PackedSFTDataset | None, PackedSFTDataset | None, None]:
    """(train, valid, None): packed chat sequences; `stats` (if given) receives the counts."""
    stats = stats if stats is not None else SFTStats()
    conversations = load_conversations(config.sft_data_path, stats)
    formatter = ChatFormatter(tokenizer, config.sft_template, config.sft_system_template)
    items = tokenize_conversations(conversations, formatter, seq_length, config.sft_overflow, stats)
    if not items:
        raise DataError(
            f"no usable conversation in {config.sft_data_path}: "
            + stats.format().replace("\n", "; ")
        )
    order = np.random.default_rng([seed, 7]).permutation(len(items))
    n_valid = math.ceil(config.sft_valid_fraction * len(items)) if len(items) > 1 else 0
    valid_items = [items[i] for i in order[:n_valid]]
    train_items = [items[i] for i in order[n_valid:]]
    datasets = []
    for split, split_items in enumerate((train_items, valid_items)):
        if not split_items:
            datasets.append(None)
            continue
        packed = pack_conversations(split_items, seq_length, tokenizer.pad)
        stats.sequences += int(packed["tokens"].shape[0])
        stats.tokens += int(sum(len(ids) for ids, _ in split_items))
        stats.loss_tokens += int(packed["loss_mask"].sum())
        datasets.append(PackedSFTDataset(packed, num_samples[split], seed + split))
    if datasets[0] is not None:
        datasets[0].stats = stats  # the training run prints them
    return datasets[0], datasets[1], None
