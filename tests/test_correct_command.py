"""The owner's `/correct` in real chats: the real python-telegram-bot and discord.py clients against
the local fakes, the engine's memory in the real Redis, corrections in the persona's folder."""

from __future__ import annotations

import asyncio
import itertools
import uuid

from bot.conversation import CORRECT_USAGE, NOTED, NOTED_WITHOUT_CONTEXT, NOTHING_TO_CORRECT
from bot.engine import UNAVAILABLE_REPLY, Engine
from bot.gate import Gate
from bot.memory import RedisMemory
from tests import test_discord as dc
from tests import test_telegram as tg
from tests.fake_discord import BOT as DC_BOT
from tests.fake_telegram import BOT as TG_BOT
from tests.platform_helpers import FixedBackend, drop_redis_keys, quiet, until
from training import corrections
from training.persona import Persona

REDIS = "redis://127.0.0.1:6379/0"
PRIVATE = "nah, I'd say hi back"
_ids = itertools.count(9000)


class Answers(FixedBackend):
    """Two messages a reply, the second naming what it answers: each reply can be told apart."""

    async def generate(self, messages):
        self.prompts.append(messages)
        return f"sure\nabout {messages[-1]['content']}"


def persona(tmp_path) -> Persona:
    """A persona with a folder (where corrections go) and a unique id in the shared Redis."""
    return Persona(name="Sam", description="Texts in short bursts.",
                   root=tmp_path / f"correct-test-{uuid.uuid4().hex}")


def stored(p: Persona) -> list[dict]:
    assert p.root is not None
    return corrections.load(corrections.corrections_file(p.root))


async def closing(engine: Engine) -> None:
    await engine.memory.close()
    drop_redis_keys(engine.persona.id)


# -- Telegram ------------------------------------------------------------------------------------

TG_OWNER = {"id": 12, "is_bot": False, "first_name": "Sam"}
TG_OWNER_RULES = quiet(owner=frozenset({"telegram:12"}), messages_per_minute=0)


def tg_clone_said(text: str, chat: dict) -> dict:
    return {"message_id": next(_ids), "date": 0, "from": TG_BOT, "chat": chat, "text": text}


def tg_correct(text: str, user: dict = TG_OWNER, reply_to: dict | None = None, chat=None) -> dict:
    msg = tg.command(text, chat=chat, user=user)
    if reply_to is not None:
        msg["reply_to_message"] = reply_to
    return msg


def tg_texts(fake, chat_id) -> list[str]:
    return [m["text"] for m in fake.sent(chat_id=chat_id)]


def test_telegram_the_owners_correct_stores_the_reply_and_what_prompted_it(tmp_path, count_tokens):
    p = persona(tmp_path)
    engine = Engine(p, Answers(), RedisMemory(REDIS), count_tokens)
    me = {"id": 12, "type": "private", "first_name": "Sam"}
    first = tg_clone_said("about hi there", me)

    async def scenario(fake):
        try:
            fake.queue(tg.dm("hi there", user=TG_OWNER))
            await until(lambda: len(fake.sent(chat_id=12)) == 2)
            fake.queue(tg.dm("what's up", user=TG_OWNER))
            await until(lambda: len(fake.sent(chat_id=12)) == 4)
            fake.queue(tg_correct(f"/correct {PRIVATE}", reply_to=first))
            await until(lambda: len(fake.sent(chat_id=12)) == 5)
            fake.queue(tg_correct("/correct sure thing", reply_to=tg_clone_said("about what's up", me)))
            await until(lambda: len(fake.sent(chat_id=12)) == 6)
        finally:
            await closing(engine)

    fake = tg.run(engine, scenario, Gate(TG_OWNER_RULES, p.id))
    assert tg_texts(fake, 12)[4:] == [NOTED, NOTED]
    older, newer = stored(p)
    assert older["source"] == "telegram" and older["text"] == PRIVATE and older["recalled"] == []
    assert older["reply"] == "sure\nabout hi there"
    assert older["context"] == [{"role": "user", "content": "hi there"}]
    assert older["reply_id"] == f"telegram:12:{first['message_id']}"
    assert newer["context"] == [{"role": "user", "content": "hi there"},
                                {"role": "assistant", "content": "sure\nabout hi there"},
                                {"role": "user", "content": "what's up"}]
    assert newer["reply"] == "sure\nabout what's up" and newer["text"] == "sure thing"
    assert len(engine.backend.prompts) == 2  # the command never reached the model


def test_telegram_in_a_group_the_context_names_who_spoke(tmp_path, count_tokens):
    p = persona(tmp_path)
    engine = Engine(p, Answers(), RedisMemory(REDIS), count_tokens)
    at = "@" + TG_BOT["username"]

    async def scenario(fake):
        try:
            fake.queue(tg.group(f"{at} how's it going", mention=True))
            await until(lambda: len(fake.sent(chat_id=tg.GROUP["id"])) == 2)
            line = fake.sent(chat_id=tg.GROUP["id"])[1]["text"]
            fake.queue(tg_correct(f"/correct{at} {PRIVATE}", chat=tg.GROUP,
                                  reply_to=tg_clone_said(line, tg.GROUP)))
            await until(lambda: len(fake.sent(chat_id=tg.GROUP["id"])) == 3)
        finally:
            await closing(engine)

    fake = tg.run(engine, scenario, Gate(TG_OWNER_RULES, p.id))
    assert tg_texts(fake, tg.GROUP["id"])[2] == NOTED
    [correction] = stored(p)
    assert correction["context"] == [{"role": "user", "content": "Ana: how's it going"}]
    assert correction["reply"] == "sure\nabout Ana: how's it going"


def test_telegram_a_non_owners_correct_is_an_unknown_command(tmp_path, count_tokens):
    p = persona(tmp_path)
    backend = Answers()
    engine = Engine(p, backend, RedisMemory(REDIS), count_tokens)
    ana_chat = {"id": tg.ANA["id"], "type": "private", "first_name": "Ana"}

    async def scenario(fake):
        try:
            fake.queue(tg.dm("hi there"))
            await until(lambda: len(fake.sent(chat_id=11)) == 2)
            fake.queue(tg_correct("/correct nope", user=tg.ANA,
                                  reply_to=tg_clone_said("about hi there", ana_chat)))
            fake.queue(tg.command("/nope"))  # what the bot does with a command it does not have
            fake.queue(tg.command("/help"))
            await until(lambda: len(fake.sent(chat_id=11)) == 3)
            fake.queue(tg.command("/help", user=TG_OWNER))
            await until(lambda: len(fake.sent(chat_id=12)) == 1)
            await asyncio.sleep(0.5)  # nothing more follows
        finally:
            await closing(engine)

    fake = tg.run(engine, scenario, Gate(TG_OWNER_RULES, p.id))
    *_, help_ = tg_texts(fake, 11)
    assert len(fake.sent(chat_id=11)) == 3  # the two replies and /help: /correct and /nope unanswered
    assert "/reset" in help_ and "correct" not in help_
    assert "/correct" in tg_texts(fake, 12)[0]
    assert len(backend.prompts) == 1 and stored(p) == []


def test_telegram_usage_and_what_cannot_be_corrected(tmp_path, count_tokens):
    p = persona(tmp_path)
    engine = Engine(p, Answers(), RedisMemory(REDIS), count_tokens)
    me = {"id": 12, "type": "private", "first_name": "Sam"}
    someone = {"message_id": next(_ids), "date": 0, "from": tg.ANA, "chat": me, "text": "hi there"}

    async def scenario(fake):
        try:
            fake.queue(tg.dm("hi there", user=TG_OWNER))
            await until(lambda: len(fake.sent(chat_id=12)) == 2)
            for msg in (tg_correct(f"/correct {PRIVATE}"),  # not a reply
                        tg_correct("/correct", reply_to=tg_clone_said("about hi there", me)),
                        tg_correct(f"/correct {PRIVATE}", reply_to=someone),
                        tg_correct(f"/correct {PRIVATE}", reply_to=tg_clone_said(UNAVAILABLE_REPLY, me)),
                        tg.command("/reset", user=TG_OWNER),
                        tg_correct(f"/correct {PRIVATE}", reply_to=tg_clone_said("about hi there", me))):
                sent = len(fake.sent(chat_id=12))
                fake.queue(msg)  # one at a time: each answer is known by its place
                await until(lambda n=sent: len(fake.sent(chat_id=12)) == n + 1)
        finally:
            await closing(engine)

    fake = tg.run(engine, scenario, Gate(TG_OWNER_RULES, p.id))
    usage, usage_too, not_the_clone, apology, reset, noted = tg_texts(fake, 12)[2:]
    assert usage == usage_too == not_the_clone == CORRECT_USAGE
    assert apology == NOTHING_TO_CORRECT and reset.startswith("Okay, fresh start")
    assert noted == NOTED_WITHOUT_CONTEXT.format(chat="chat")
    [correction] = stored(p)  # the window was cleared: the replied-to text, no context
    assert correction["context"] == [] and correction["reply"] == "about hi there"
    assert correction["text"] == PRIVATE and correction["source"] == "telegram"


# -- Discord -------------------------------------------------------------------------------------

DC_OWNER = {**dc.ANA, "id": "555555555555555555", "username": "sam", "global_name": "Sam"}
DC_OWNER_DM = "300000000000000009"
DC_OWNER_RULES = quiet(owner=frozenset({f"discord:{DC_OWNER['id']}"}), messages_per_minute=0)


def dc_texts(fake, channel: str) -> list[str]:
    return dc.replies(fake, channel)


def test_discord_the_owners_correct_stores_the_reply_and_what_prompted_it(tmp_path, count_tokens,
                                                                          monkeypatch):
    p = persona(tmp_path)
    engine = Engine(p, Answers(), RedisMemory(REDIS), count_tokens)
    replied: dict | None = None

    async def scenario(fake):
        nonlocal replied
        try:
            await fake.push(fake.message("hi there", DC_OWNER, DC_OWNER_DM))
            await until(lambda: len(fake.sent(DC_OWNER_DM)) == 2)
            await fake.push(fake.message("what's up", DC_OWNER, DC_OWNER_DM))
            await until(lambda: len(fake.sent(DC_OWNER_DM)) == 4)
            replied = fake.message("about what's up", DC_BOT, DC_OWNER_DM)
            await fake.push(fake.message(f"/correct {PRIVATE}", DC_OWNER, DC_OWNER_DM, referenced=replied))
            await until(lambda: len(fake.sent(DC_OWNER_DM)) == 5)
            # in a server channel: a reply to the clone is addressed to it, mention or not
            await fake.push(fake.message(f"{dc.ME} how's it going", dc.ANA, dc.GUILD_CHANNEL, dc.GUILD,
                                         mentions=[DC_BOT]))
            await until(lambda: len(fake.sent(dc.GUILD_CHANNEL)) == 2)
            line = fake.message(fake.sent(dc.GUILD_CHANNEL)[0]["content"], DC_BOT, dc.GUILD_CHANNEL,
                                dc.GUILD)
            await fake.push(fake.message("/correct yo", DC_OWNER, dc.GUILD_CHANNEL, dc.GUILD,
                                         referenced=line))
            await until(lambda: len(fake.sent(dc.GUILD_CHANNEL)) == 3)
        finally:
            await closing(engine)

    fake = dc.run(engine, monkeypatch, scenario, Gate(DC_OWNER_RULES, p.id))
    assert replied is not None
    assert dc_texts(fake, DC_OWNER_DM)[4] == NOTED and dc_texts(fake, dc.GUILD_CHANNEL)[2] == NOTED
    in_dm, in_server = stored(p)
    assert in_dm["source"] == "discord" and in_dm["text"] == PRIVATE and in_dm["recalled"] == []
    assert in_dm["reply_id"] == f"discord:{DC_OWNER_DM}:{replied['id']}"
    assert in_dm["context"] == [{"role": "user", "content": "hi there"},
                                {"role": "assistant", "content": "sure\nabout hi there"},
                                {"role": "user", "content": "what's up"}]
    assert in_dm["reply"] == "sure\nabout what's up"
    assert in_server["context"] == [{"role": "user", "content": "Ana: how's it going"}]
    assert in_server["reply"] == "sure\nabout Ana: how's it going" and in_server["text"] == "yo"
    assert len(engine.backend.prompts) == 3


def test_discord_a_non_owners_correct_is_an_ordinary_message(tmp_path, count_tokens, monkeypatch):
    p = persona(tmp_path)
    backend = Answers()
    engine = Engine(p, backend, RedisMemory(REDIS), count_tokens)

    async def scenario(fake):
        try:
            await fake.push(fake.message("hi there", dc.ANA, dc.DM_CHANNEL))
            await until(lambda: len(fake.sent(dc.DM_CHANNEL)) == 2)
            mine = fake.message("about hi there", DC_BOT, dc.DM_CHANNEL)
            await fake.push(fake.message("/correct nope", dc.ANA, dc.DM_CHANNEL, referenced=mine))
            await until(lambda: len(fake.sent(dc.DM_CHANNEL)) == 4)
            await fake.push(fake.message("/nope", dc.ANA, dc.DM_CHANNEL))  # an unknown command
            await until(lambda: len(fake.sent(dc.DM_CHANNEL)) == 6)
            await fake.push(fake.message("/help", dc.ANA, dc.DM_CHANNEL))
            await until(lambda: len(fake.sent(dc.DM_CHANNEL)) == 7)
            await fake.push(fake.message("/help", DC_OWNER, DC_OWNER_DM))
            await until(lambda: len(fake.sent(DC_OWNER_DM)) == 1)
            await fake.push_interaction(fake.interaction("help", dc.ANA, dc.DM_CHANNEL))
            await fake.push_interaction(fake.interaction("help", DC_OWNER, DC_OWNER_DM))
            await until(lambda: len(fake.interaction_replies()) == 2)
        finally:
            await closing(engine)

    fake = dc.run(engine, monkeypatch, scenario, Gate(DC_OWNER_RULES, p.id))
    texts = dc_texts(fake, dc.DM_CHANNEL)
    # "/correct nope" went to the model like "/nope" did: no trace of the command
    assert texts[2:6] == ["sure", "about /correct nope", "sure", "about /nope"]
    assert "/reset" in texts[6] and "correct" not in texts[6]
    assert "/correct" in dc_texts(fake, DC_OWNER_DM)[0]
    assert {c["name"] for c in fake.commands} == {"reset", "forget", "help", "about"}
    slash = {r["data"]["content"]: r["data"].get("flags", 0) for r in fake.interaction_replies()}
    theirs, owners = sorted(slash, key=lambda text: "/correct" in text)
    assert "/correct" not in theirs and not slash[theirs] & 64
    assert "/correct" in owners and slash[owners] & 64  # the owner's list only the owner sees
    assert len(backend.prompts) == 3 and stored(p) == []


def test_discord_usage(tmp_path, count_tokens, monkeypatch):
    p = persona(tmp_path)
    engine = Engine(p, Answers(), RedisMemory(REDIS), count_tokens)

    async def scenario(fake):
        try:
            await fake.push(fake.message(f"/correct {PRIVATE}", DC_OWNER, DC_OWNER_DM))
            await until(lambda: len(fake.sent(DC_OWNER_DM)) == 1)
            mine = fake.message("about hi there", DC_BOT, DC_OWNER_DM)
            await fake.push(fake.message("/correct   ", DC_OWNER, DC_OWNER_DM, referenced=mine))
            await until(lambda: len(fake.sent(DC_OWNER_DM)) == 2)
            theirs = fake.message("hi there", dc.ANA, DC_OWNER_DM)
            await fake.push(fake.message(f"/correct {PRIVATE}", DC_OWNER, DC_OWNER_DM, referenced=theirs))
            await until(lambda: len(fake.sent(DC_OWNER_DM)) == 3)
        finally:
            await closing(engine)

    fake = dc.run(engine, monkeypatch, scenario, Gate(DC_OWNER_RULES, p.id))
    assert dc_texts(fake, DC_OWNER_DM) == [CORRECT_USAGE] * 3
    assert engine.backend.prompts == [] and stored(p) == []


def test_telegram_the_owners_menu_lists_correct_in_their_chat_alone():
    import json

    from telegram import Bot

    from bot.telegram import register_commands
    from tests.fake_telegram import FakeTelegram

    fake = FakeTelegram()

    async def main():
        await fake.start()
        try:
            async with Bot(fake.token, base_url=fake.base_url) as bot:
                await register_commands(bot, ["telegram:12", "discord:456"])
        finally:
            await fake.stop()

    asyncio.run(main())
    everyone, owner = fake.sent("setMyCommands")
    assert [c["command"] for c in json.loads(everyone["commands"])] == ["reset", "forget", "help", "about"]
    assert "scope" not in everyone or json.loads(everyone["scope"])["type"] == "default"
    assert [c["command"] for c in json.loads(owner["commands"])][-1] == "correct"
    assert json.loads(owner["scope"]) == {"type": "chat", "chat_id": 12}
