"""The chat engine: a message comes in, the clone's messages go out. It knows no platform.

cut a message longer than any prompt to its end -> recall the channel's recent conversation, and
(with a Recaller) the knowledge, past exchanges and earlier words of this user that match the
message -> build the prompt through the prompt contract (the one training used) -> generate (a
backend that cannot answer gets an apology sent instead) -> post-process into a burst of
messages -> remember the exchange, unless the channel was reset meanwhile, and the message in
this user's long-term memory.

The generation contract lives here too (`Backend`, `Generated`, `Busy`), so the engine never
imports torch: a bot that generates on a remote server (`LLM_BASE_URL`) never loads it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from bot.memory import ChannelKey, KeyedLocks, Memory, Turn
from bot.postprocess import to_messages
from bot.recall import (
    Asked,
    FactAnswers,
    RecallAnswers,
    Recaller,
    Scored,
    fact_answer,
    grounding,
    grounds,
    recall_answer,
)
from training.persona import Persona
from training.prompt import (
    CHARS_PER_TOKEN,
    RECALL_TOKENS,
    Recalled,
    Utterance,
    fit_recalled,
    keep_end,
    keep_end_within,
    prompt_tokens,
    to_chat_messages,
    without_recall,
)

log = logging.getLogger(__name__)
BUSY_REPLY = "Sorry, I'm swamped right now. Try again in a minute?"
UNAVAILABLE_REPLY = "Sorry, I can't answer right now. Try again in a minute?"


class Busy(Exception):
    """Too many requests are already waiting: the backend refuses at once."""


class Unavailable(RuntimeError):
    """The backend cannot answer (its server is unreachable or failed). Its message names what
    failed, never message text, so it can be logged."""


@dataclass(frozen=True)
class Generated:
    """The model's next turn, and whether it was cut by the token cap before it ended."""

    text: str
    truncated: bool = False


class Backend(Protocol):
    async def generate(self, messages: list[dict[str, str]]) -> Generated | str: ...

    async def close(self) -> None: ...


@runtime_checkable
class Grounded(Protocol):
    """A backend that can also decode turns grounded in their recalled items: weighed against
    `plain`, the same prompt without them (context-aware decoding), `candidates` of them at once.
    Used when a question's answer is in the person's knowledge base and the reply should say it
    rather than improvise."""

    async def generate_grounded(self, messages: list[dict[str, str]], plain: list[dict[str, str]],
                                candidates: int = 1) -> list[Generated]: ...


@dataclass(frozen=True)
class Delivery:
    """Human-like pacing: a pause before each message that grows with its length, bounded."""

    enabled: bool = False
    chars_per_second: float = 15.0
    min_s: float = 0.4
    max_s: float = 4.0

    def delay(self, message: str) -> float:
        if not self.enabled:
            return 0.0
        return min(self.max_s, max(self.min_s, len(message) / self.chars_per_second))


@dataclass(frozen=True)
class Incoming:
    platform: str
    channel: str
    author_id: str
    author: str
    text: str
    is_dm: bool = True


class Engine:
    def __init__(
        self,
        persona: Persona,
        backend: Backend,
        memory: Memory,
        count_tokens: Callable[[str], int],
        prompt_tokens: int = 512,  # the dataset's sample budget: the context the clone was trained on
        recaller: Recaller | None = None,
        recall_tokens: int = RECALL_TOKENS,  # of prompt_tokens, at most, for recalled items
        fact_answers: FactAnswers | None = None,  # None: every reply is generated
        grounded_min: float | None = None,  # a question this near a knowledge item: grounded decoding
        grounded_candidates: int = 1,  # grounded replies sampled; the nearest to the knowledge is sent
        recall_answers: RecallAnswers | None = None,  # None: a user's words are only shown to the model
    ) -> None:
        self.persona, self.backend, self.memory = persona, backend, memory
        self.count_tokens, self.prompt_tokens = count_tokens, prompt_tokens
        self.recaller, self.recall_tokens = recaller, recall_tokens
        self.fact_answers, self.grounded_min = fact_answers, grounded_min
        self.grounded_candidates = grounded_candidates
        self.recall_answers = recall_answers
        self._order = KeyedLocks()
        # Called with each prompt before it is generated from: the owner's console shows what a reply
        # drew on and stores it with a correction. None (the bots): nothing is kept.
        self.on_prompt: Callable[[ChannelKey, list[dict[str, str]], list[Recalled]], None] | None = None

    def key(self, platform: str, channel: str) -> ChannelKey:
        return ChannelKey(self.persona.id, platform, channel)

    def in_order(self, platform: str, channel: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold a channel while its message is answered: an adapter enters this first thing (before
        any await) so that messages of one channel are answered, remembered and sent in arrival
        order, while other channels go on in parallel."""
        return self._order.hold(self.key(platform, channel).base())

    def prompt(self, history: list[Turn], incoming: Incoming,
               recalled: list[Recalled] | None = None) -> list[dict[str, str]]:
        """The prompt contract over the recalled items and as much recent history as fits the
        token budget; a message over the budget on its own keeps its end."""
        recalled = recalled or []
        others = {t.author_id for t in history if not t.from_persona} | {incoming.author_id}
        group = not incoming.is_dm or len(others) > 1
        utterances = [Utterance(t.author, t.text, t.from_persona) for t in history]
        utterances.append(Utterance(incoming.author, incoming.text, False))
        while True:
            messages = to_chat_messages(self.persona, utterances, group, recalled)
            size = prompt_tokens(messages, self.count_tokens)
            if size <= self.prompt_tokens:
                return messages
            if len(utterances) > 1:
                utterances = utterances[1:]  # the oldest goes first
                continue
            [alone] = utterances  # the incoming message, over the budget by itself
            room = self.prompt_tokens - (size - self.count_tokens(alone.text))
            text = keep_end_within(alone.text, self.count_tokens, room)
            return to_chat_messages(self.persona, [replace(alone, text=text)], group, recalled)

    async def handle(self, incoming: Incoming) -> list[str]:
        started = time.monotonic()
        in_chars = len(incoming.text)
        # Cut by characters before anything tokenizes it: a megabyte of text must cost what a full
        # prompt costs. The end stays (see keep_end); what is remembered is the cut text too.
        incoming = replace(incoming, text=keep_end(incoming.text, self.prompt_tokens * CHARS_PER_TOKEN))
        key = self.key(incoming.platform, incoming.channel)
        history, epoch = await self.memory.recall(key)
        asked = Asked(incoming.platform, incoming.author_id, incoming.author, incoming.text)
        vector = await self.recaller.embed(incoming.text) if self.recaller else None
        found = await self._recall(asked, vector, history)
        recalled = fit_recalled([f.item for f in found], self.count_tokens, self.recall_tokens)
        prompt = self.prompt(history, incoming, recalled)
        if self.on_prompt is not None:  # a fact answer drew on the same items: the console shows them
            self.on_prompt(key, prompt, recalled)
        raw = await self._answer(prompt, incoming, found)
        if isinstance(raw, str):  # the backend could not answer: say so, remember nothing
            return [raw]
        speakers = {t.author for t in history if not t.from_persona} | {incoming.author}
        replies = to_messages(raw.text, other_speakers=speakers, truncated=raw.truncated)
        now = time.time()
        turns = [Turn(incoming.author_id, incoming.author, incoming.text, False, now)]
        if replies:
            turns.append(Turn("persona", self.persona.name, "\n".join(replies), True, now))
        await self.memory.append(key, turns, epoch)  # refused if the channel was reset meanwhile
        if self.recaller is not None and vector is not None:
            await self.recaller.remember(asked, vector, now)
        log.info(
            "reply platform=%s channel=%s in_chars=%d out_messages=%d history=%d took=%.2fs",
            incoming.platform, incoming.channel, in_chars, len(replies), len(history),
            time.monotonic() - started,
        )
        return replies

    async def _recall(self, asked: Asked, vector, history: list[Turn]) -> list[Scored]:
        """What the message recalls, best first; none without a Recaller. What the rolling
        window still shows (from its oldest turn on) is not recalled again."""
        if self.recaller is None or vector is None:
            return []
        before = history[0].at if history else None
        return await self.recaller.recall(asked, vector, before)

    async def _answer(self, prompt: list[dict[str, str]], incoming: Incoming,
                      found: list[Scored]) -> Generated | str:
        """The person's own written answer when the message asks a knowledge-base question near
        certainly (a 135M model copies a recalled fact into its reply only a third of the time);
        the user's own earlier words told back when they ask about themselves as surely; else the
        model's turn, grounded in the recalled items when a question matches knowledge closely."""
        fact = fact_answer(found, incoming.text, self.fact_answers)
        if fact is not None:
            log.info("fact answer platform=%s channel=%s similarity=%.2f",
                     incoming.platform, incoming.channel, fact.similarity)
            return Generated(fact.item.text)
        told = recall_answer(found, incoming.text, self.recall_answers)
        if told is not None:
            log.info("recall answer platform=%s channel=%s", incoming.platform, incoming.channel)
            return Generated(told)
        if self._grounded(found, incoming.text):
            log.info("grounded reply platform=%s channel=%s", incoming.platform, incoming.channel)
            return await self._grounded_reply(prompt, incoming, found)
        return await self._generate(prompt, incoming)

    def _grounded(self, found: list[Scored], text: str) -> bool:
        return isinstance(self.backend, Grounded) and grounds(found, text, self.grounded_min)

    async def _grounded_reply(self, prompt: list[dict[str, str]], incoming: Incoming,
                              found: list[Scored]) -> Generated | str:
        """Grounded candidates sampled at once, and the one whose meaning comes nearest to the
        knowledge that grounds them, judged by what it would send (one cut before its end keeps
        its finished sentences): a 135M model says the recalled fact in some of its samples, rarely
        in all (benchmarks/README.md, knowledge.py)."""
        tries = await self._generate(prompt, incoming, without_recall(prompt), self.grounded_candidates)
        if isinstance(tries, str):
            return tries
        sent = [(t, "\n".join(to_messages(t.text, truncated=t.truncated))) for t in tries]
        made = [(t, text) for t, text in sent if text]
        if len(made) < 2:
            return made[0][0] if made else tries[0]
        assert self.recaller is not None and self.grounded_min is not None  # _grounded found knowledge
        knowledge = [f.item.text for f in grounding(found, self.grounded_min)]
        return made[await self.recaller.most_supported([text for _, text in made], knowledge)][0]

    async def _generate(self, messages: list[dict[str, str]], incoming: Incoming,
                        plain: list[dict[str, str]] | None = None, candidates: int = 1,
                        ) -> Generated | list[Generated] | str:
        """The model's turn, or `candidates` turns grounded against `plain` when given; or the
        apology to send instead when the backend cannot answer."""
        where = f"{incoming.platform}/{incoming.channel}"
        try:
            if plain is not None:
                grounded = self.backend.generate_grounded  # type: ignore[attr-defined]
                return await grounded(messages, plain, candidates)
            raw = await self.backend.generate(messages)
        except Busy:
            log.warning("Busy: a reply in %s was refused", where)
            return BUSY_REPLY
        except Exception as e:  # a dead server or a failed batch must not end the chat or the bot
            # An Unavailable names what failed; any other error's text could quote the prompt.
            why = str(e) if isinstance(e, Unavailable) else type(e).__name__
            log.warning("No reply in %s: generation failed (%s)", where, why)
            return UNAVAILABLE_REPLY
        # A backend that cannot tell whether it was cut: take it as whole.
        return Generated(raw) if isinstance(raw, str) else raw

    async def context_of(
        self, platform: str, channel: str, is_dm: bool, sent_as: Callable[[str], bool],
    ) -> tuple[list[dict[str, str]], str] | None:
        """For the owner's correction of one of the clone's replies in a channel: the conversation
        turns that prompted it (user/assistant as its prompt showed them, no system prompt; none
        when they have left the window) and the reply's whole text, for the newest remembered reply
        that `sent_as` recognizes; None when the window no longer holds it."""
        history, _ = await self.memory.recall(self.key(platform, channel))
        at = next((i for i in reversed(range(len(history)))
                   if history[i].from_persona and sent_as(history[i].text)), None)
        if at is None:
            return None
        before, reply = history[:at], history[at].text
        if not before or before[-1].from_persona:  # the message it answered has left the window
            return [], reply
        *older, asked = before
        incoming = Incoming(platform, channel, asked.author_id, asked.author, asked.text, is_dm)
        return [m for m in self.prompt(older, incoming) if m["role"] != "system"], reply

    async def reset(self, platform: str, channel: str) -> None:
        """Forget the channel's conversation; raises MemoryUnavailable when it could not."""
        await self.memory.reset(self.key(platform, channel))

    async def forget(self, author_id: str) -> int:
        """Delete what `author_id` said, everywhere (conversations and long-term memory); raises
        MemoryUnavailable when it could not."""
        deleted = await self.memory.forget_user(self.persona.id, author_id)
        if self.recaller is not None:  # mostly the same messages again: count them once
            deleted = max(deleted, await self.recaller.forget(author_id))
        return deleted
