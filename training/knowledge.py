"""What a clone can recall: the person's knowledge base and their own past exchanges, as items.

    facts      a question/answer table's rows (the exports' CSV): asked -> the person's answer
    notes      `knowledge/*.md|*.txt` in the persona folder, split into passages of a few sentences
    exchanges  someone's message -> the person's reply, from the training conversations

Every item's text is redacted before it is kept, so nothing an index holds was not scrubbed.
A note file that cannot be read stops with one line naming it; a passage too long is split.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from training.limits import MiB, size_text
from training.privacy import Redactor
from training.prompt import Recalled, Utterance

NOTE_SUFFIXES = (".md", ".txt")
MAX_NOTE_BYTES = 4 * MiB    # one note file; a book is not a note
PASSAGE_CHARS = 400         # a passage: a few sentences, one idea, a fraction of the recall budget
EXCHANGE_CHARS = 300        # each side of a past exchange, cut to its end (what was answered)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_HEADING = re.compile(r"\s*#{1,6}(\s|$)")  # a markdown heading; "#1 rule" and "#blessed" are text


# A message that asks something: a question mark, or a first word that opens a question ("what
# genre do you listen to"). Statements that share a fact's words ("I love basketball") are not
# asking for it: on the sample's chats they were most of the fact answers that did not fit.
QUESTION_WORDS = frozenset({
    "what", "where", "when", "who", "whom", "whose", "which", "why", "how", "do", "does", "did",
    "are", "is", "was", "were", "have", "has", "can", "could", "would", "will", "should"})
_WORD = re.compile(r"[a-z']+")


def is_question(text: str) -> bool:
    words = _WORD.findall(text.casefold())
    return "?" in text or bool(words and words[0] in QUESTION_WORDS)


class KnowledgeError(ValueError):
    """A knowledge file that cannot be used; the message names it, in one line."""


@dataclass(frozen=True, slots=True)
class Item:
    kind: str               # "fact", "note" or "exchange"
    text: str               # the person's words
    asked: str | None = None  # what the text answered (facts and exchanges)
    source: str = ""        # the conversation key (exchanges) or the file's name (facts, notes)

    def embedded_text(self) -> str:
        """What retrieval compares an incoming message with: what was asked, where something
        was (measured on paraphrased questions: 31 of 34 facts first, against 22 of 34 with
        question and answer as a fact's only view), else the passage. A fact has a second
        view beside it: answered_text."""
        return self.asked or self.text

    def answered_text(self) -> str | None:
        """A fact's question with its answer: retrieval also compares a message with this and
        keeps the closer of the two, so a paraphrase that shares words with the answer rather
        than the question ("where did you grow up?" -> "Where are you from? South Carolina. I
        grew up in the country") still finds it (the sample's retrieval_dev.csv: right item
        first 43 of 46 against 40 by the question alone; figures in benchmarks/README.md).
        None for notes and exchanges."""
        return f"{self.asked} {self.text}" if self.kind == "fact" and self.asked else None

    def recalled(self) -> Recalled:
        return Recalled(self.text, asked=self.asked)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "text": self.text, "asked": self.asked, "source": self.source}


def _tail(text: str, chars: int) -> str:
    return text if len(text) <= chars else "…" + text[len(text) - chars + 1 :]


def exchanges(utts: Sequence[Utterance], source: str, kind: str = "exchange") -> Iterator[Item]:
    """Each run of someone else's messages followed by the person's reply, as an item."""
    asked: list[str] = []
    reply: list[str] = []
    for u in [*utts, None]:
        if u is not None and u.from_persona:
            reply.append(u.text)
            continue
        if asked and reply:
            yield Item(kind, _tail("\n".join(reply), EXCHANGE_CHARS),
                       _tail("\n".join(asked), EXCHANGE_CHARS), source)
        if reply:
            asked, reply = [], []
        if u is not None:
            asked.append(u.text)


def passages(text: str, limit: int = PASSAGE_CHARS) -> list[str]:
    """Paragraphs of a note (headings dropped), each split at sentence ends to fit `limit`."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.splitlines() if ln.strip() and not _HEADING.match(ln)]
        if not lines:
            continue
        current = ""
        for sentence in _SENTENCE_END.split(" ".join(lines)):
            for piece in _hard_split(sentence, limit):
                if current and len(current) + 1 + len(piece) > limit:
                    out.append(current)
                    current = ""
                current = f"{current} {piece}".strip()
        if current:
            out.append(current)
    return out


def _hard_split(sentence: str, limit: int) -> list[str]:
    """A sentence longer than `limit` in pieces at word boundaries (or anywhere, for one word)."""
    pieces, current = [], ""
    for word in sentence.split():
        if len(word) > limit and current:  # the words before it stay before it
            pieces.append(current)
            current = ""
        while len(word) > limit:
            pieces.append(word[:limit])
            word = word[limit:]
        if current and len(current) + 1 + len(word) > limit:
            pieces.append(current)
            current = ""
        current = f"{current} {word}".strip()
    return [*pieces, current] if current else pieces


def note_files(folder: Path | None) -> list[Path]:
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in NOTE_SUFFIXES and p.is_file())


def read_note(path: Path) -> str:
    """A note's text, or KnowledgeError naming the file."""
    try:
        size = path.stat().st_size
        if size > MAX_NOTE_BYTES:
            raise KnowledgeError(f"{path}: {size_text(size)} is over the {size_text(MAX_NOTE_BYTES)} "
                                 f"a knowledge note may hold; split it into several files")
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise KnowledgeError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise KnowledgeError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None


def notes(folder: Path | None, redactor: Redactor) -> list[Item]:
    """Every passage of every note under `folder`, redacted."""
    items = []
    for path in note_files(folder):
        for passage in passages(read_note(path)):
            text, _ = redactor.redact(passage)
            items.append(Item("note", text, source=str(path.relative_to(folder))))
    return items
