"""What the clone recalls when a message comes in, and what it keeps of it for later.

    the persona index    facts and notes of the knowledge base, the person's past exchanges
                         (the active adapter's index, else the dataset's), reloaded when a
                         `clone knowledge` command rewrites it
    long-term memory     what this user said before, per persona, platform and user
                         (bot.longterm: Redis when there is one, else a file)

One embedding of the incoming message serves both searches and is kept with the message. The
embedding model runs in a worker thread, off the event loop. Items of both kinds are merged by
score, best first, for the prompt contract's `fit_recalled`. Only redacted text is remembered.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bot.longterm import LongTerm, Remembered
from training.index import KNOWLEDGE_BONUS, MIN_SCORE, IndexProblem, PersonaIndex, TextEmbedder
from training.knowledge import Item
from training.privacy import Redactor
from training.prompt import RECALL_ITEMS, Recalled

log = logging.getLogger(__name__)
INDEX_CHECK_S = 10.0  # how often the index folder is looked at for a rewrite
# A message that asks something: a question mark, or a first word that opens a question ("what
# genre do you listen to"). Statements that share a fact's words ("I love basketball") are not
# asking for it: on the sample's chats they were most of the fact answers that did not fit.
_QUESTION_WORDS = frozenset({
    "what", "where", "when", "who", "whom", "whose", "which", "why", "how", "do", "does", "did",
    "are", "is", "was", "were", "have", "has", "can", "could", "would", "will", "should"})
_WORD = re.compile(r"[a-z']+")


@dataclass(frozen=True)
class Scored:
    """A recalled item with its kind ("fact", "note", "exchange", or "said": a user's earlier
    words) and how similar its question or text is to the message (cosine, before the bonus
    that ranks knowledge above exchanges)."""

    item: Recalled
    kind: str
    similarity: float
    score: float  # what ranks it: the similarity plus any bonus


@dataclass(frozen=True)
class FactAnswers:
    """When a message asks one of the knowledge base's questions so closely that the person's
    own written answer is sent instead of a generated one (CLONE_FACT_ANSWER_MIN). Calibrated on
    the sample's ordinary incoming chat messages, never on its evaluation questions (figures in
    benchmarks/README.md)."""

    min_similarity: float = 0.7
    margin: float = 0.02  # over the next item's score: no near tie with another answer


def scored(found: list[tuple[float, Item]]) -> list[Scored]:
    """The persona index's search results as recall ranks them."""
    return [Scored(item.recalled(), item.kind, s - (item.kind != "exchange") * KNOWLEDGE_BONUS, s)
            for s, item in found]


def is_question(text: str) -> bool:
    words = _WORD.findall(text.casefold())
    return "?" in text or bool(words and words[0] in _QUESTION_WORDS)


def fact_answer(found: list[Scored], text: str, rule: FactAnswers | None) -> Scored | None:
    """The knowledge-base fact `text` asks for, when it is near certain; None otherwise (or
    without a rule)."""
    if rule is None or not found or not is_question(text):
        return None
    best = found[0]
    if best.kind != "fact" or best.similarity < rule.min_similarity:
        return None
    return best if len(found) < 2 or best.score - found[1].score >= rule.margin else None


@dataclass(frozen=True)
class Asked:
    """One incoming message as recall needs it."""

    platform: str
    author_id: str
    author: str
    text: str


class IndexFollower:
    """The persona index of a folder, reloaded when its index.json changes (a knowledge edit).
    With `locate`, the folder itself is looked up again at each check: when `clone serve`'s
    watcher swaps in another adapter, that adapter's index follows it."""

    def __init__(self, folder: Path | None, model: str,
                 locate: Callable[[], Path | None] | None = None) -> None:
        self.folder, self.model, self.locate = folder, model, locate
        self.index: PersonaIndex | None = None
        self._stamp: float | None = None
        self._checked = 0.0
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> PersonaIndex | None:
        now = time.monotonic()
        if not force and now - self._checked < INDEX_CHECK_S:
            return self.index
        self._checked = now
        if self.locate is not None and (folder := self.locate()) != self.folder:
            self.folder, self._stamp = folder, None
        if self.folder is None:
            return self.index
        try:
            stamp = (self.folder / "index.json").stat().st_mtime
        except OSError:
            return self.index
        if stamp != self._stamp:
            try:
                self.index, self._stamp = PersonaIndex.load(self.folder, self.model), stamp
                log.info("Persona index loaded: %d items", len(self.index))
            except IndexProblem as e:
                log.warning("Persona index not used: %s (run `clone knowledge reindex`)", e)
                self._stamp = stamp
        return self.index


class Recaller:
    def __init__(self, persona_id: str, embedder: TextEmbedder, index: IndexFollower | None,
                 longterm: LongTerm | None, blocklist: tuple[str, ...] = ()) -> None:
        self.persona_id, self.embedder = persona_id, embedder
        self.index, self.longterm = index, longterm
        self.redactor = Redactor(blocklist)

    async def embed(self, text: str) -> np.ndarray:
        [vector] = await asyncio.to_thread(self.embedder.embed, [text])
        return vector

    async def recall(self, asked: Asked, vector: np.ndarray, before: float | None) -> list[Scored]:
        """Best first: the index's items, and what this user said before `before` (the oldest
        turn the rolling window still shows), each counted as knowledge."""
        found: list[Scored] = []
        index = self.index.refresh() if self.index else None
        if index is not None:
            found += scored(index.search(vector, RECALL_ITEMS, MIN_SCORE))
        if self.longterm is not None:
            said = await self.longterm.search(self.persona_id, asked.platform, asked.author_id, vector,
                                              RECALL_ITEMS, before=before, min_score=MIN_SCORE)
            found += [Scored(Recalled(r.text, speaker=r.speaker), "said", s, s + KNOWLEDGE_BONUS)
                      for s, r in said]
        found.sort(key=lambda f: -f.score)
        return found

    async def remember(self, asked: Asked, vector: np.ndarray, at: float) -> None:
        if self.longterm is None:
            return
        text, _ = self.redactor.redact(asked.text)
        await self.longterm.add(self.persona_id, asked.platform, asked.author_id,
                                [Remembered(text, asked.author, at, vector)])

    async def forget(self, author_id: str) -> int:
        return await self.longterm.forget_user(self.persona_id, author_id) if self.longterm else 0

    async def close(self) -> None:
        if self.longterm is not None:
            await self.longterm.close()
