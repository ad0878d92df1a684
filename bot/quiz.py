"""Asking the clone questions through the engine, as a user would, and checking its answers.

    knowledge  questions about the person (`eval_questions.csv`: question, expected words with
               `|` between alternatives), each in a fresh channel: is the fact in the reply?
    long-term  a user tells the clone something, the channel's window is cleared (/reset, or
               many unrelated messages), then the user asks for it back

Every question goes through `Engine.handle`, the path a Telegram message takes, with the
backend, recall and memory given; channels are asked concurrently, so a local backend batches.
"""

from __future__ import annotations

import asyncio
import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bot.engine import Engine, Incoming
from bot.generation import GenerationSettings
from bot.longterm import EmbeddedLongTerm, LongTerm
from bot.memory import EmbeddedMemory, Turn
from bot.recall import (
    GROUNDED_CANDIDATES,
    GROUNDED_MIN,
    Asked,
    FactAnswers,
    IndexFollower,
    RecallAnswers,
    Recaller,
)
from training.index import TextEmbedder
from training.persona import Persona

AT_ONCE = 8  # channels asked at the same time: a local backend's batch
QUESTIONS_FILE = "eval_questions.csv"  # in the persona folder; never indexed, never trained on
FILLER = ("ok", "haha", "what are you up to today", "cool", "nice weather lately", "lol",
          "did you see the game", "i'm so tired", "what's for dinner", "brb")


@dataclass(frozen=True)
class Question:
    text: str
    expect: tuple[str, ...]  # any of these in the reply (case-insensitive) is right

    def answered_by(self, reply: str) -> bool:
        return any(e.casefold() in reply.casefold() for e in self.expect)


@dataclass(frozen=True)
class Fact:
    """Something a user tells the clone, and the question that asks it back."""

    tell: str
    ask: str
    expect: tuple[str, ...]


def read_questions(path: Path) -> list[Question]:
    """A `question,expect` CSV; expected words separated by `|`."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"question", "expect"} <= set(rows[0]):
        raise ValueError(f"{path}: needs the columns question,expect")
    return [Question(r["question"].strip(), tuple(e.strip() for e in r["expect"].split("|") if e.strip()))
            for r in rows if r["question"].strip() and r["expect"].strip()]


def _incoming(channel: str, text: str, user: str = "quiz-user") -> Incoming:
    return Incoming("quiz", channel, user, "Alex", text)


async def _at_most(n: int, jobs: Sequence) -> list:
    """Run the coroutines `n` at a time: as many users as a backend batches, none refused busy."""
    gate = asyncio.Semaphore(n)

    async def one(job):
        async with gate:
            return await job

    return await asyncio.gather(*(one(j) for j in jobs))


async def knowledge_quiz(engine: Engine, questions: Sequence[Question]) -> dict:
    """Each question in its own channel; the share the clone answers with the fact."""
    replies = await _at_most(AT_ONCE, [
        engine.handle(_incoming(f"k{i}", q.text, f"k{i}")) for i, q in enumerate(questions)])
    answers = [{"question": q.text, "reply": "\n".join(r), "right": q.answered_by("\n".join(r))}
               for q, r in zip(questions, replies, strict=True)]
    right = sum(a["right"] for a in answers)
    return {"asked": len(answers), "right": right,
            "accuracy": round(right / len(answers), 3) if answers else None, "answers": answers}


async def _chat_on(engine: Engine, incoming: Incoming, count: int) -> None:
    """`count` unrelated exchanges in the channel, remembered as the engine remembers them, without
    generating the clone's side (its words do not matter here; a hundred replies would take
    minutes on a CPU)."""
    key = engine.key(incoming.platform, incoming.channel)
    vectors: dict[str, object] = {}  # the same few fillers: each embedded once
    for n in range(count):
        text, now = FILLER[n % len(FILLER)], time.time()
        await engine.memory.append(key, [Turn(incoming.author_id, incoming.author, text, False, now),
                                         Turn("persona", engine.persona.name, "haha yeah", True, now)])
        if engine.recaller is not None:
            if text not in vectors:
                vectors[text] = await engine.recaller.embed(text)
            asked = Asked(incoming.platform, incoming.author_id, incoming.author, text)
            await engine.recaller.remember(asked, vectors[text], now)


async def _tell_clear_ask(engine: Engine, i: int, fact: Fact, fillers: int) -> bool:
    channel, user = f"lt{i}", f"lt-user{i}"
    await engine.handle(_incoming(channel, fact.tell, user))
    if fillers:
        await _chat_on(engine, _incoming(channel, "", user), fillers)
    else:
        await engine.reset("quiz", channel)
    reply = "\n".join(await engine.handle(_incoming(channel, fact.ask, user)))
    return Question(fact.ask, fact.expect).answered_by(reply)


async def recall_quiz(engine: Engine, facts: Sequence[Fact], fillers: int = 0) -> dict:
    """Tell, clear the window (/reset, or `fillers` unrelated messages), ask: the share recalled."""
    right = await _at_most(AT_ONCE, [_tell_clear_ask(engine, i, f, fillers) for i, f in enumerate(facts)])
    return {"asked": len(facts), "right": sum(right),
            "accuracy": round(sum(right) / len(facts), 3) if facts else None}


def quiz_engine(persona: Persona, model, tokenizer, index: Path | None, embedder: TextEmbedder | None,
                longterm: LongTerm | None = None, settings: GenerationSettings | None = None,
                answers: bool = False) -> Engine:
    """An engine over `model` as `clone chat` builds one, its memory in this process only; without
    `embedder`, nothing is recalled. `answers`: fact and recall answers and grounded decoding on,
    at serving's defaults (off: every reply is generated by plain sampling)."""
    from bot.generation import LocalBackend
    from training.base_model import token_counter

    count = token_counter(tokenizer)
    recaller = None
    if embedder is not None:
        follower = IndexFollower(index, embedder.name) if index else None
        recaller = Recaller(persona.id, embedder, follower, longterm or EmbeddedLongTerm(None),
                            persona.blocklist)
    rules = ({"fact_answers": FactAnswers(), "recall_answers": RecallAnswers(), "grounded_min": GROUNDED_MIN,
              "grounded_candidates": GROUNDED_CANDIDATES} if recaller and answers else {})
    return Engine(persona, LocalBackend(model, tokenizer, settings), EmbeddedMemory(None, count_tokens=count),
                  count, recaller=recaller, **rules)


def ask_persona(persona: Persona, model, tokenizer, index: Path | None) -> dict | None:
    """The knowledge quiz of `persona`'s eval_questions.csv (None when it has none), through an
    engine that recalls from `index` and answers as `clone chat` does (fact answers on)."""
    assert persona.root is not None
    path = persona.root / QUESTIONS_FILE
    if not path.is_file():
        return None
    from training.embed import Embedder

    engine = quiz_engine(persona, model, tokenizer, index, Embedder(), answers=True)  # as served
    result = asyncio.run(knowledge_quiz(engine, read_questions(path)))
    return {**result, "questions": QUESTIONS_FILE}
