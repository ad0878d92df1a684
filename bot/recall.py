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
from training.index import (
    FACT_ANSWER_MARGIN,
    FACT_ANSWER_MIN,
    KNOWLEDGE_BONUS,
    MIN_SCORE,
    IndexProblem,
    PersonaIndex,
    TextEmbedder,
    fact_is_answer,
)
from training.knowledge import QUESTION_WORDS as _QUESTION_WORDS
from training.knowledge import Item, is_question
from training.privacy import Redactor
from training.prompt import RECALL_ITEMS, Recalled

log = logging.getLogger(__name__)
INDEX_CHECK_S = 10.0  # how often the index folder is looked at for a rewrite
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

    min_similarity: float = FACT_ANSWER_MIN
    margin: float = FACT_ANSWER_MARGIN  # over the next item's score: no near tie with another answer


def scored(found: list[tuple[float, Item]]) -> list[Scored]:
    """The persona index's search results as recall ranks them."""
    return [Scored(item.recalled(), item.kind, s - (item.kind != "exchange") * KNOWLEDGE_BONUS, s)
            for s, item in found]


def fact_answer(found: list[Scored], text: str, rule: FactAnswers | None) -> Scored | None:
    """The knowledge-base fact `text` asks for, when it is near certain; None otherwise (or
    without a rule)."""
    if rule is None or not found or not is_question(text):
        return None
    best = found[0]
    near = fact_is_answer(best.kind, best.similarity, [f.score for f in found], rule.min_similarity,
                          rule.margin)
    return best if near else None


# Grounded decoding from this similarity on (CLONE_GROUNDED_MIN). Calibrated on the sample's
# ordinary incoming messages and measured on its knowledge quiz (figures in benchmarks/README.md).
GROUNDED_MIN = 0.6
# Grounded replies sampled at once (a local backend batches them); the one nearest in meaning to
# the knowledge that grounds them is sent (CLONE_GROUNDED_CANDIDATES; 1: the first one).
GROUNDED_CANDIDATES = 8


def grounding(found: list[Scored], least: float) -> list[Scored]:
    """The person's knowledge (facts and notes) among the items a prompt can show, at least
    `least` similar to the message."""
    return [f for f in found[:RECALL_ITEMS] if f.kind in ("fact", "note") and f.similarity >= least]


def grounds(found: list[Scored], text: str, least: float | None) -> bool:
    """Whether a reply to `text` is decoded grounded in its recalled items (Engine, and
    training.generate.RecallContrast): it is a question, and one of the items a prompt can show
    is the person's knowledge (a fact or a note) at least `least` similar. None: never."""
    return least is not None and is_question(text) and bool(grounding(found, least))


def nearest_to(replies: np.ndarray, knowledge: np.ndarray) -> int:
    """Which of the replies' (normalized) embeddings comes nearest in meaning to any of the
    knowledge items': the candidate that says what the person wrote down."""
    return int(np.argmax((replies @ knowledge.T).max(axis=1)))


@dataclass(frozen=True)
class RecallAnswers:
    """When a user asks about themselves ("what's my dog's name?") and their own earlier words
    answer it near certainly ("my dog's name is Rex"), those words are told back to them ("your
    dog's name is Rex") instead of a generated reply: a 135M model copied a recalled line into its
    reply 0-5 times in 30 (CLONE_RECALL_ANSWER_MIN). Calibrated on real users' own earlier words
    in the chitchat corpus the sample comes from, never on the recall quiz (figures in
    benchmarks/README.md)."""

    min_similarity: float = 0.45
    margin: float = 0.05  # over the next different thing the user said


# Words that make a message about its writer, and those that carry no subject of their own.
_SELF = frozenset({"i", "i'm", "im", "i've", "i'll", "i'd", "me", "my", "mine", "myself"})
_SUBJECT = _SELF - {"me"}  # "keep me in stress mode?" is not about the writer's own facts
_FILLER = _QUESTION_WORDS | _SELF | frozenset({
    "the", "a", "an", "am", "to", "of", "in", "on", "at", "for", "from", "by", "with", "and", "or",
    "it", "that", "this", "what's", "whats", "where's", "who's", "you", "your", "be", "been", "so",
    "just", "really", "again", "remember", "tell", "know", "u", "ur", "up", "now", "still", "ever",
    "any", "some", "there", "here", "about", "all", "said", "told", "he", "she", "him", "her", "his",
    "they", "them", "their", "its", "we", "us", "our", "not", "don't", "think", "probably"})
# Told back: the user's first person becomes the second, and the clone's second person its first.
_TOLD_BACK = {
    "i": "you", "me": "you", "my": "your", "mine": "yours", "myself": "yourself", "i'm": "you're",
    "im": "you're", "i've": "you've", "i'll": "you'll", "i'd": "you'd", "am": "are",
    "you": "me", "your": "my", "yours": "mine", "yourself": "myself", "you're": "I'm", "ur": "my"}
_AFTER = {("i", "was"): "were", ("you", "are"): "am", ("you", "were"): "was"}
_TAKES_OBJECT = frozenset({
    "told", "tell", "to", "with", "for", "at", "about", "love", "miss", "thank", "see", "saw", "ask",
    "asked", "show", "showed", "give", "gave", "let", "from", "call", "called", "text", "texted",
    "like", "met", "meet", "remind", "reminded", "than", "and"})
_TOKEN = re.compile(r"[A-Za-z']+")
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*")
_WH = frozenset({"what", "what's", "whats", "where", "where's", "when", "who", "who's", "whom", "whose",
                 "which", "how", "how's"})
_LEAD_IN = frozenset({"do", "you", "u", "remember", "know", "recall", "hey", "so", "and", "but", "ok",
                      "okay", "btw", "wait", "quick", "question", "lol", "haha"})
_YOU = frozenset({"you", "your", "yours", "yourself", "you're", "u", "ur"})
_MEMORY = frozenset({"remember", "recall", "know"})
_MODAL = frozenset({"should", "could", "would", "can", "will", "shall", "might", "must"})
_VOCATIVE = frozenset({"man", "friend", "dude", "bro", "guy", "god", "gosh", "goodness", "lord", "dear"})
MAX_QUESTION_WORDS = 12
MAX_UNMARKED_WORDS = 8
_AUXILIARY = frozenset({"is", "are", "am", "was", "were", "do", "does", "did", "have", "has", "had"})


def _words(text: str) -> list[str]:
    return _WORD.findall(text.casefold().replace("\u2019", "'"))


def about_self(text: str) -> bool:
    return not _SELF.isdisjoint(_words(text))


def subject_words(text: str) -> set[str]:
    """What a message is about, roughly stemmed: "lives" and "live" meet, "dog's" and "dog"."""
    words = (w.removesuffix("'s") for w in _words(text))
    return {w[:4] if len(w) > 4 else w for w in words if w not in _FILLER and len(w) > 1}


def sentences(text: str) -> list[str]:
    return [m.strip() for m in _SENTENCE.findall(text) if m.strip()]


def asks_about_self(text: str) -> str | None:
    """The question in `text` when it asks the user's own facts back ("what's my dog's name?",
    "do you remember where I live?"): short, opening with a wh-word, about the writer and not
    about the clone ("how about yourself?", "did I talk to you?" are not). None otherwise."""
    asked = [x for x in sentences(text) if x.endswith("?")]
    if not asked:
        asked = [x for x in sentences(text) if unmarked_question(x)][-1:]
    if not asked:
        return None
    words, lead = _words(asked[-1]), set()
    while words and words[0] in _LEAD_IN:
        lead.add(words.pop(0))
    if len(words) < 2 or words[0] not in _WH or len(words) > MAX_QUESTION_WORDS:
        return None
    # "which I think is cool", "when I go see it": a clause, not a question. "what if", "how
    # about": no fact asked. "should I", "how do I": advice, not memory. "my man": a greeting.
    mine = [w for n, w in enumerate(words) if w in _SUBJECT and not (
        w == "my" and words[n + 1:n + 2] and words[n + 1] in _VOCATIVE)]
    # "what's my dog's name" asks; so does "do you remember where I live".
    clause = (words[1] in _SELF and not (words[1] == "my" and words[0].endswith("s"))
              and lead.isdisjoint(_MEMORY))
    if (not mine or clause or words[1] in ("if", "about") or not _MODAL.isdisjoint(words)
            or words[:3] == ["how", "do", "i"]):
        return None
    return None if to_the_clone(words) else asked[-1]


def to_the_clone(words: list[str]) -> bool:
    """Whether the clone is a subject of these words ("how about yourself"), not only an object
    ("did I tell you")."""
    return any(w in _YOU and (n == 0 or words[n - 1] not in _TAKES_OBJECT) for n, w in enumerate(words))


def asks_about_clone(text: str) -> bool:
    """A question to the clone about itself ("what's your cat's name?"): the second person as its
    subject, and no first person."""
    return is_question(text) and not about_self(text) and to_the_clone(_words(text))


def unmarked_question(sentence: str) -> bool:
    """A question without its question mark: short, unpunctuated, "whats ..." or a wh-word then
    a verb ("where do i live"). "which" and "when" open many statements ("which i suppose is
    design", "when I go see it")."""
    words = _words(sentence)
    if sentence.rstrip()[-1:] in ".!" or not 2 <= len(words) <= MAX_UNMARKED_WORDS:
        return False
    return words[0] in _WH and (words[0].endswith("s") or words[1] in _AUXILIARY)


def best_sentence(said: str, question: str) -> str | None:
    """The sentence of what the user said that is about them and shares the most with the
    question; None when none shares a word."""
    wanted = subject_words(question)
    scored_sentences = [(len(subject_words(x) & wanted), x) for x in sentences(said)
                        if about_self(x) and not x.endswith("?")]
    best = max(scored_sentences, key=lambda pair: pair[0], default=(0, None))
    return best[1] if best[0] else None


def told_back(text: str) -> str:
    """A user's own words said back to them: "I was born in Lisbon" -> "You were born in Lisbon"."""
    text = text.replace("\u2019", "'")
    tokens, swapped, previous = _TOKEN.findall(text), [], ""
    for token in tokens:
        low = token.casefold()
        if low == "you":  # an object after these ("I told you"), else a subject ("you know")
            word = "me" if previous in _TAKES_OBJECT else "I"
        else:
            word = _AFTER.get((previous, low)) or _TOLD_BACK.get(low, token)
        swapped.append(word)
        previous = low
    if swapped and tokens[0][0].isupper():
        swapped[0] = swapped[0][0].upper() + swapped[0][1:]
    gaps = _TOKEN.split(text)  # the text between the words, kept as it was
    return "".join(g + w for g, w in zip(gaps, [*swapped, ""], strict=True))


def recall_answer(found: list[Scored], text: str, rule: RecallAnswers | None) -> str | None:
    """The user's own earlier words told back, when `text` asks about the user and one thing they
    said answers it near certainly; None otherwise (or without a rule)."""
    question = asks_about_self(text) if rule is not None else None
    if question is None:
        return None
    said = [f for f in found if f.kind == "said" and not is_question(f.item.text) and about_self(f.item.text)]
    if not said or said[0].similarity < rule.min_similarity:
        return None
    best = said[0]
    others = [f for f in said[1:] if f.item.text.casefold() != best.item.text.casefold()]
    if others and best.similarity - others[0].similarity < rule.margin:
        return None
    sentence = best_sentence(best.item.text, question)
    return told_back(sentence) if sentence else None


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

    async def most_supported(self, replies: list[str], knowledge: list[str]) -> int:
        """Which reply says most nearly what `knowledge` says (see nearest_to)."""
        vectors = await asyncio.to_thread(self.embedder.embed, [*replies, *knowledge])
        return nearest_to(vectors[: len(replies)], vectors[len(replies):])

    async def recall(self, asked: Asked, vector: np.ndarray, before: float | None) -> list[Scored]:
        """Best first: the index's items, and what this user said before `before` (the oldest
        turn the rolling window still shows), each counted as knowledge."""
        found: list[Scored] = []
        index = self.index.refresh() if self.index else None
        if index is not None:
            found += scored(index.search(vector, RECALL_ITEMS, MIN_SCORE))
        # Asked about the clone ("what's your cat's name?"), a user's own words are not recalled:
        # what makes them similar to the question ("my cat is called Pickles") is what a 135M
        # model took for its own answer.
        if self.longterm is not None and not asks_about_clone(asked.text):
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
