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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bot.longterm import LongTerm, Remembered
from training.index import KNOWLEDGE_BONUS, MIN_SCORE, IndexProblem, PersonaIndex, TextEmbedder
from training.privacy import Redactor
from training.prompt import RECALL_ITEMS, Recalled

log = logging.getLogger(__name__)
INDEX_CHECK_S = 10.0  # how often the index folder is looked at for a rewrite


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

    async def recall(self, asked: Asked, vector: np.ndarray, before: float | None) -> list[Recalled]:
        """Best first: the index's items, and what this user said before `before` (the oldest
        turn the rolling window still shows), each counted as knowledge."""
        found: list[tuple[float, Recalled]] = []
        index = self.index.refresh() if self.index else None
        if index is not None:
            found += [(s, item.recalled()) for s, item in index.search(vector, RECALL_ITEMS, MIN_SCORE)]
        if self.longterm is not None:
            said = await self.longterm.search(self.persona_id, asked.platform, asked.author_id, vector,
                                              RECALL_ITEMS, before=before, min_score=MIN_SCORE)
            found += [(s + KNOWLEDGE_BONUS, Recalled(r.text, speaker=r.speaker)) for s, r in said]
        found.sort(key=lambda pair: -pair[0])
        return [r for _, r in found]

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
