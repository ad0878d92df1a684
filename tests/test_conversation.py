"""The shared conversation flow, with a real Engine, memory and Gate, and a chat that keeps what it
is sent (the adapters' own chats are tested through the real clients in test_telegram/test_discord)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator

import pytest

from bot.conversation import COMMANDS, NOT_HERE, Conversation, Inbound, Platform, command_in
from bot.discord_bot import DISCORD
from bot.engine import Engine
from bot.gate import RATE_LIMIT_REPLY, Gate, Rules, Sender
from bot.memory import EmbeddedMemory
from bot.telegram import TELEGRAM
from tests.platform_helpers import FixedBackend, quiet
from training.persona import Persona

PERSONA = Persona(name="Sam", description="Texts in short bursts.")
LOUD = Platform("telegram", "chat", "a chat", defuse=str.upper)  # its "defusing" shows where it ran
_ids = itertools.count(1)


class KeptChat:
    """A chat that keeps (text, quoted) for each text sent, and whether "typing" was shown."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bool]] = []
        self.typing_shown = self.typing_open = 0

    async def send(self, texts: list[str], quote: bool = False) -> int:
        self.sent += [(text, quote and i == 0) for i, text in enumerate(texts)]
        return len(texts)

    @contextlib.asynccontextmanager
    async def typing(self) -> AsyncIterator[None]:
        self.typing_shown += 1
        self.typing_open += 1
        try:
            yield
        finally:
            self.typing_open -= 1

    def texts(self) -> list[str]:
        return [text for text, _ in self.sent]


def inbound(text: str, user: str = "11", chat: str = "11", is_dm: bool = True) -> Inbound:
    sender = Sender("telegram", user, chat, str(next(_ids)))
    return Inbound(sender, "Ana", text, is_dm, command_in(text))


def conversation(tmp_path, count_tokens, rules: Rules | None = None, backend=None,
                 platform: Platform = LOUD) -> Conversation:
    engine = Engine(PERSONA, backend or FixedBackend(), EmbeddedMemory(tmp_path / "m.json"), count_tokens)
    return Conversation(engine, platform, Gate(rules or quiet(), PERSONA.id))


def test_a_group_reply_is_introduced_defused_and_quotes_once(tmp_path, count_tokens):
    flow = conversation(tmp_path, count_tokens, Rules(about="Ask @sam_real instead"),
                        FixedBackend("hi @ana\nbye"))
    group, dm = KeptChat(), KeptChat()

    async def main():
        await flow.handle(inbound("hello all", chat="-500", is_dm=False), group)
        await flow.handle(inbound("and you?", chat="-500", is_dm=False), group)
        await flow.handle(inbound("just us"), dm)

    asyncio.run(main())
    # The owner's about text goes out as written; only the model's output is defused.
    assert group.sent == [("Ask @sam_real instead", True), ("HI @ANA", False), ("BYE", False),
                          ("HI @ANA", True), ("BYE", False)]
    assert dm.sent == [("Ask @sam_real instead", False), ("HI @ANA", False), ("BYE", False)]
    assert group.typing_shown == 2 and group.typing_open == 0


def test_over_the_rate_limit_the_user_is_told_once_and_forget_still_works(tmp_path, count_tokens):
    flow = conversation(tmp_path, count_tokens, quiet(messages_per_minute=1), FixedBackend("ok"))
    chat = KeptChat()

    async def main():
        for text in ("one", "two", "three", "/forget"):
            await flow.handle(inbound(text), chat)

    asyncio.run(main())
    assert chat.texts() == ["OK", RATE_LIMIT_REPLY, "Done: removed 1 of your messages from my memory."]
    assert chat.typing_shown == 1  # neither refusals nor commands reach the model


def test_commands_use_the_platforms_words_and_never_reach_the_model(tmp_path, count_tokens):
    backend = FixedBackend()
    flows = {p.name: conversation(tmp_path, count_tokens, backend=backend, platform=p)
             for p in (TELEGRAM, DISCORD)}
    chats = {name: KeptChat() for name in flows}

    async def main():
        for name, flow in flows.items():
            for command in ("/reset", "/help", "/start", "/about"):
                await flow.handle(inbound(command), chats[name])

    asyncio.run(main())
    reset, help_, start, about = chats["telegram"].texts()
    assert reset == "Okay, fresh start: I've forgotten this chat."
    assert help_ == start == TELEGRAM.help() and "in a private chat" in help_
    assert "in every chat" in help_ and "channel" not in help_
    assert about.startswith("This is an AI clone of Sam, not Sam in person.")
    reset, help_, _, about_too = chats["discord"].texts()
    assert reset == "Okay, fresh start: I've forgotten this channel."
    assert help_ == DISCORD.help() and "in every channel" in help_ and about_too == about
    assert backend.prompts == []
    assert TELEGRAM.menu()["reset"] == "Forget this chat's conversation"
    assert DISCORD.menu()["forget"] == "Delete everything you said to me, in every channel"


def test_command_replies_for_slash_commands(tmp_path, count_tokens):
    rules = quiet(block_users=frozenset({"telegram:13"}), messages_per_minute=1)
    flow = conversation(tmp_path, count_tokens, rules)

    def sender(user: str, message: str) -> Sender:
        return Sender("telegram", user, "11", message)

    async def main():
        return [
            await flow.answer_command("/about", sender("11", "a")),
            await flow.answer_command("/about", sender("11", "a")),  # the same one again
            await flow.answer_command("/help", sender("11", "b")),  # over the limit
            await flow.answer_command("/forget", sender("11", "c")),  # never refused
            await flow.answer_command("/reset", sender("13", "d")),  # blocked
        ]

    about, duplicate, limited, forget, blocked = asyncio.run(main())
    assert about is not None and "AI clone of Sam" in about.text and not about.private
    assert duplicate is None
    assert limited is not None and (limited.text, limited.private) == (RATE_LIMIT_REPLY, True)
    assert forget is not None and forget.private and forget.text.startswith("Done: removed 0")
    assert blocked is not None and (blocked.text, blocked.private) == (NOT_HERE, True)


def test_an_engine_failure_ends_that_reply_only(tmp_path, count_tokens, caplog):
    caplog.set_level(logging.DEBUG)
    flow = conversation(tmp_path, count_tokens)
    real = flow.engine.handle

    async def handle(incoming):
        if incoming.text == "explode":
            raise RuntimeError("boom")
        return await real(incoming)

    flow.engine.handle = handle
    chat = KeptChat()

    async def main():
        with pytest.raises(RuntimeError):
            await flow.handle(inbound("explode"), chat)
        await flow.handle(inbound("still there?"), chat)  # the chat's turn was given back

    asyncio.run(main())
    assert chat.texts() == ["HELLO", "THERE"] and chat.typing_open == 0
    assert "still there" not in caplog.text and "in_chars=12 out_messages=2 sent=2" in caplog.text


def test_without_a_gate_its_keys_use_the_persona_id(tmp_path, count_tokens):
    persona = Persona(name="Sam Smith")
    engine = Engine(persona, FixedBackend(), EmbeddedMemory(tmp_path / "m.json"), count_tokens)
    flow = Conversation(engine, TELEGRAM)
    assert flow.gate.persona == persona.id == "sam-smith"
    assert "AI clone of Sam Smith" in flow.about


def test_commands_are_the_first_word_only():
    assert [command_in(t) for t in ("/About me", "/forget", " /reset ", "/resets", "hi /help", "")] == [
        "/about", "/forget", "/reset", None, None, None]
    assert set(COMMANDS) == {"/reset", "/forget", "/help", "/start", "/about"}
