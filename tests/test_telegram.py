"""The real python-telegram-bot Application, polling a local fake Bot API, in front of a real Engine."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid

from bot.chunks import TELEGRAM_LIMIT, split_message
from bot.engine import Engine
from bot.gate import RATE_LIMIT_REPLY, Gate, RedisState, Rules
from bot.generation import GenerationSettings, LocalBackend
from bot.memory import ChannelKey, EmbeddedMemory, RedisMemory
from bot.telegram import REPOLL_S, build_application
from tests.fake_telegram import BOT, FakeTelegram
from tests.platform_helpers import FixedBackend, SlowFirstBackend, drop_redis_keys, quiet, until
from training.base_model import load_model, resolve_base
from training.persona import Persona

PERSONA = Persona(name="Sam", description="Texts in short bursts.")
ANA = {"id": 11, "is_bot": False, "first_name": "Ana"}
GROUP = {"id": -500, "type": "group", "title": "friends"}


_message_ids = itertools.count(1)


def dm(text: str, user=ANA, message_id: int | None = None, entities=None) -> dict:
    """A private-chat message; each gets its own id unless `message_id` says otherwise."""
    msg = {"message_id": message_id or next(_message_ids), "date": int(time.time()), "from": user,
           "chat": {"id": user["id"], "type": "private", "first_name": user["first_name"]},
           "text": text}
    if entities:
        msg["entities"] = entities
    return msg


def command(text: str, chat=None, user=ANA) -> dict:
    msg = dm(text, user)
    if chat:
        msg["chat"] = chat
    msg["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
    return msg


def group(text: str, user=ANA, mention: bool = False, reply_to: dict | None = None) -> dict:
    msg = dm(text, user)
    msg["chat"] = GROUP
    if mention:
        at = "@" + BOT["username"]
        msg["entities"] = [{"type": "mention", "offset": text.index(at), "length": len(at)}]
    if reply_to:
        msg["reply_to_message"] = reply_to
    return msg


def run(engine: Engine, scenario, gate: Gate | None = None) -> FakeTelegram:
    """Start the fake and the real Application, run `scenario(fake)`, shut both down cleanly."""
    fake = FakeTelegram()

    async def main():
        await fake.start()
        app = build_application(fake.token, engine, base_url=fake.base_url,
                                gate=gate or Gate(quiet(), engine.persona.name))
        await app.initialize()
        await app.start()
        await app.updater.start_polling(poll_interval=0, timeout=1)
        try:
            await scenario(fake)
        finally:
            await app.updater.stop()
            await app.stop()
            await app.shutdown()
            await fake.stop()

    asyncio.run(main())
    return fake


def fixed_engine(tmp_path, count_tokens, backend=None) -> Engine:
    return Engine(PERSONA, backend or FixedBackend(), EmbeddedMemory(tmp_path / "m.json"), count_tokens)


def test_a_dm_with_the_real_model_sends_what_the_engine_returned(tiny_base, tokenizer, tmp_path,
                                                                 count_tokens):
    backend = LocalBackend(load_model(resolve_base(str(tiny_base))), tokenizer,
                           GenerationSettings(max_new_tokens=6))
    engine = Engine(PERSONA, backend, EmbeddedMemory(tmp_path / "m.json"), count_tokens)
    results: list[list[str]] = []
    real = engine.handle

    async def spy(incoming):
        results.append(await real(incoming))
        return results[-1]

    engine.handle = spy

    async def scenario(fake):
        fake.queue(dm("hello there"))
        await until(lambda: results)
        await asyncio.sleep(0.3)  # any sends that follow the reply
        await backend.close()

    fake = run(engine, scenario)
    expected = [p for r in results[0] for p in split_message(r, TELEGRAM_LIMIT)]
    assert [m["text"] for m in fake.sent(chat_id=11)] == expected
    assert fake.sent("sendChatAction", chat_id=11)[0]["action"] == "typing"


def test_a_dm_gets_each_message_in_order_to_the_right_chat(tmp_path, count_tokens, caplog):
    caplog.set_level(logging.DEBUG)
    backend = FixedBackend()
    engine = fixed_engine(tmp_path, count_tokens, backend)

    async def scenario(fake):
        fake.queue(dm("how are you?"))
        await until(lambda: len(fake.sent()) >= 2)
        await asyncio.sleep(0.2)

    fake = run(engine, scenario)
    assert [(m["chat_id"], m["text"]) for m in fake.sent()] == [("11", "hello"), ("11", "there")]
    assert fake.sent("sendChatAction", chat_id=11)[0]["action"] == "typing"
    assert backend.prompts[0][-1]["content"].endswith("how are you?")
    ours = [r.getMessage() for r in caplog.records if not r.name.startswith("aiohttp")]
    assert any("in_chars=12 out_messages=2 sent=2" in m for m in ours)
    assert not [m for m in ours if "how are you" in m or "hello" in m or fake.token in m]


def test_groups_need_a_mention_or_a_reply_and_bots_are_ignored(tmp_path, count_tokens):
    backend = FixedBackend()
    engine = fixed_engine(tmp_path, count_tokens, backend)
    bot_user = {"id": 77, "is_bot": True, "first_name": "Other bot"}
    own_message = {"message_id": 5, "date": 0, "from": BOT, "chat": GROUP, "text": "earlier"}

    async def scenario(fake):
        fake.queue(group("just chatting among ourselves"))
        fake.queue(dm("I am a bot", user=bot_user))
        fake.queue(group(f"@{BOT['username']} from a bot", user=bot_user, mention=True))
        await asyncio.sleep(0.5)
        assert fake.sent() == [] and backend.prompts == []
        fake.queue(group(f"@{BOT['username']} what's up?", mention=True))
        await until(lambda: len(fake.sent(chat_id=-500)) == 2)
        fake.queue(group("and you?", reply_to=own_message))
        await until(lambda: len(fake.sent(chat_id=-500)) == 4)
        await asyncio.sleep(0.2)

    fake = run(engine, scenario)
    assert len(backend.prompts) == 2
    first = backend.prompts[0][-1]["content"]
    assert first.endswith("what's up?") and "@" not in first  # the mention is stripped
    assert backend.prompts[1][-1]["content"].endswith("and you?")
    assert fake.sent(chat_id=77) == []


def test_commands_reset_forget_about_help(tmp_path, count_tokens):
    memory = EmbeddedMemory(tmp_path / "m.json")
    engine = Engine(PERSONA, FixedBackend(), memory, count_tokens)
    key = ChannelKey(engine.persona.id, "telegram", "11")

    async def scenario(fake):
        fake.queue(dm("remember me"))
        await until(lambda: len(fake.sent()) == 2)
        assert len((await memory.recall(key))[0]) == 2
        fake.queue(command("/reset"))
        await until(lambda: len(fake.sent()) == 3)
        assert (await memory.recall(key))[0] == []
        fake.queue(dm("again"))
        await until(lambda: len(fake.sent()) == 5)
        fake.queue(command("/forget"))
        await until(lambda: len(fake.sent()) == 6)
        fake.queue(command("/about"))
        await until(lambda: len(fake.sent()) == 7)
        fake.queue(command("/help"))
        await until(lambda: len(fake.sent()) == 8)
        fake.queue(command(f"/about@{BOT['username']}", chat=GROUP))
        await until(lambda: len(fake.sent()) == 9)
        fake.queue(command("/start"))  # what Telegram sends when someone opens the bot
        await until(lambda: len(fake.sent()) == 10)

    fake = run(engine, scenario, Gate(quiet(messages_per_minute=0), engine.persona.id))
    texts = [m["text"] for m in fake.sent()]
    assert texts[2] == "Okay, fresh start: I've forgotten this chat."
    assert texts[5] == "Done: removed 1 of your messages from my memory."
    assert "AI clone of Sam" in texts[6] and "not Sam in person" in texts[6]
    assert "/reset" in texts[7] and "/forget" in texts[7] and "in a private chat" in texts[7]
    assert fake.sent(chat_id=-500)[0]["text"] == texts[6]
    assert texts[9] == texts[7]


def test_edits_and_commands_for_another_bot_are_not_answered(tmp_path, count_tokens):
    backend = FixedBackend()
    engine = fixed_engine(tmp_path, count_tokens, backend)

    async def scenario(fake):
        fake.queue(dm("a typo"), kind="edited_message")
        fake.queue(command("/about@some_other_bot", chat=GROUP))
        fake.queue(command("/help@some_other_bot", chat=GROUP), kind="edited_message")
        await asyncio.sleep(0.5)
        fake.queue(dm("a new message"))
        await until(lambda: len(fake.sent()) == 2)
        await asyncio.sleep(0.2)

    fake = run(engine, scenario)
    assert [m["text"] for m in fake.sent()] == ["hello", "there"]
    assert len(backend.prompts) == 1 and backend.prompts[0][-1]["content"].endswith("a new message")


def test_a_rate_limit_on_send_is_survived(tmp_path, count_tokens):
    engine = fixed_engine(tmp_path, count_tokens)

    async def scenario(fake):
        fake.rate_limit_next = 2  # the first piece and its one retry both get a 429
        fake.queue(dm("first"))
        await until(lambda: fake.rate_limit_next == 0)
        await asyncio.sleep(0.3)
        fake.queue(dm("second", message_id=2))
        await until(lambda: len([c for c in fake.calls if c.method == "sendMessage"]) == 4)
        await asyncio.sleep(0.2)

    fake = run(engine, scenario)
    sends = [c.params["text"] for c in fake.calls if c.method == "sendMessage"]
    assert sends == ["hello", "hello", "hello", "there"]  # gave up the first reply, then answered


def test_model_output_mentions_no_one(tmp_path, count_tokens):
    engine = fixed_engine(tmp_path, count_tokens, FixedBackend("ask @ana_smith or email me@x.org"))

    async def scenario(fake):
        fake.queue(dm("who knows?"))
        await until(lambda: len(fake.sent()) == 1)

    fake = run(engine, scenario)
    text = fake.sent()[0]["text"]
    assert "@ana_smith" not in text and text.replace("\u2060", "") == "ask @ana_smith or email me@x.org"


def test_dropped_connections_are_retried(tmp_path, count_tokens, caplog):
    caplog.set_level(logging.INFO)
    engine = fixed_engine(tmp_path, count_tokens)

    async def scenario(fake):
        fake.drop_next = {"getUpdates": 1, "sendMessage": 1}
        fake.queue(dm("are you there?"))
        await until(lambda: len(fake.sent()) == 3, timeout=20)
        await asyncio.sleep(0.3)

    fake = run(engine, scenario)
    assert [m["text"] for m in fake.sent()] == ["hello", "hello", "there"]  # the dropped one again
    assert fake.drop_next == {"getUpdates": 0, "sendMessage": 0}
    assert "send retried chat=11 error=NetworkError" in caplog.text


def test_with_redis_memory_the_chat_continues_and_forget_counts(tmp_path, count_tokens):
    persona = Persona(name=f"tg-test-{uuid.uuid4().hex}", description="Texts in short bursts.")
    backend = FixedBackend()
    memory = RedisMemory("redis://127.0.0.1:6379/0")
    engine = Engine(persona, backend, memory, count_tokens)

    async def scenario(fake):
        fake.queue(dm("first question"))
        await until(lambda: len(fake.sent()) == 2)
        fake.queue(dm("second question", message_id=2))
        await until(lambda: len(fake.sent()) == 4)
        fake.queue(command("/forget"))
        await until(lambda: len(fake.sent()) == 5)
        await engine.reset("telegram", "11")  # leave nothing behind in the shared Redis
        await memory.close()

    fake = run(engine, scenario)
    second_prompt = "\n".join(m["content"] for m in backend.prompts[1])
    assert "first question" in second_prompt and "hello\nthere" in second_prompt
    assert fake.sent()[4]["text"] == "Done: removed 2 of your messages from my memory."


def test_access_lists_the_owner_and_the_rate_limit(tmp_path, count_tokens):
    owner = {"id": 12, "is_bot": False, "first_name": "Sam"}
    blocked = {"id": 13, "is_bot": False, "first_name": "Troll"}
    rules = quiet(owner=frozenset({"telegram:12"}), block_users=frozenset({"telegram:13"}),
                  messages_per_minute=2)
    backend = FixedBackend("hi")
    engine = fixed_engine(tmp_path, count_tokens, backend)

    async def scenario(fake):
        for i in range(4):
            fake.queue(dm(f"ana {i}"))
            fake.queue(dm(f"owner {i}", user=owner))
            fake.queue(dm(f"troll {i}", user=blocked))
        await until(lambda: len(fake.sent(chat_id=11)) == 3 and len(fake.sent(chat_id=12)) == 4)
        fake.queue(command("/forget", user=blocked))  # a deletion request is never refused
        await until(lambda: len(fake.sent(chat_id=13)) == 1)
        await asyncio.sleep(0.3)

    fake = run(engine, scenario, Gate(rules, "Sam"))
    assert [m["text"] for m in fake.sent(chat_id=11)] == ["hi", "hi", RATE_LIMIT_REPLY]  # told once
    assert [m["text"] for m in fake.sent(chat_id=12)] == ["hi"] * 4  # the owner is never limited
    assert fake.sent(chat_id=13)[0]["text"].startswith("Done: removed 0")
    assert not any("troll" in m[-1]["content"] for m in backend.prompts)
    assert fake.sent("sendChatAction", chat_id=13) == []


def test_a_configured_group_is_answered_without_a_mention_and_replies_quote(tmp_path, count_tokens):
    engine = fixed_engine(tmp_path, count_tokens)

    async def scenario(fake):
        fake.queue(group("anyone up?"))
        await until(lambda: len(fake.sent(chat_id=-500)) == 2)
        await asyncio.sleep(0.2)

    fake = run(engine, scenario, Gate(quiet(reply_in=frozenset({"telegram:-500"})), "Sam"))
    first, second = fake.sent(chat_id=-500)
    assert json.loads(first["reply_parameters"])["message_id"] > 0  # quotes the message it answers
    assert json.loads(first["reply_parameters"])["allow_sending_without_reply"] is True
    assert "reply_parameters" not in second


def test_one_chat_keeps_its_order_and_never_holds_up_another(tmp_path, count_tokens):
    backend = SlowFirstBackend(delays=[1.0, 0.4, 0.0, 0.0])
    engine = fixed_engine(tmp_path, count_tokens, backend)
    bea = {"id": 14, "is_bot": False, "first_name": "Bea"}

    async def scenario(fake):
        for text in ("one", "two", "three"):
            fake.queue(dm(text))
        fake.queue(dm("other chat", user=bea))
        await until(lambda: len(fake.sent(chat_id=11)) == 3)
        await asyncio.sleep(0.2)

    fake = run(engine, scenario, Gate(quiet(messages_per_minute=0), "Sam"))
    assert [m["text"] for m in fake.sent(chat_id=11)] == ["re: one", "re: two", "re: three"]
    order = [str(c.params.get("chat_id")) for c in fake.calls if c.method == "sendMessage"]
    assert order.index("14") < order.index("11")  # Bea's quick answer did not wait for Ana's chat


def test_two_processes_answer_a_message_once(tmp_path, count_tokens):
    """During a deploy the old and the new process can both receive an update: with the gate's
    state in Redis, exactly one of them answers it."""
    persona = f"tg-test-{uuid.uuid4().hex}"
    backends = [FixedBackend("from one"), FixedBackend("from the other")]
    fakes = [FakeTelegram(), FakeTelegram()]

    async def main():
        apps, gates = [], []
        for i, fake in enumerate(fakes):
            await fake.start()
            gate = Gate(quiet(messages_per_minute=0), persona, RedisState("redis://127.0.0.1:6379/0"))
            engine = Engine(PERSONA, backends[i], EmbeddedMemory(tmp_path / f"m{i}.json"), count_tokens)
            app = build_application(fake.token, engine, base_url=fake.base_url, gate=gate)
            await app.initialize()
            await app.start()
            await app.updater.start_polling(poll_interval=0, timeout=1)
            apps.append(app)
            gates.append(gate)
        try:
            for n in range(10):
                message = dm(f"message {n}")
                for fake in fakes:
                    fake.queue(message)  # the same message (chat, id) reaches both
            await until(lambda: sum(len(f.sent()) for f in fakes) == 10)
            await asyncio.sleep(0.5)  # and nothing more follows
        finally:
            for app, gate, fake in zip(apps, gates, fakes, strict=True):
                await app.updater.stop()
                await app.stop()
                await app.shutdown()
                await gate.close()
                await fake.stop()
            drop_redis_keys(persona)

    asyncio.run(main())
    assert sum(len(f.sent()) for f in fakes) == 10
    assert sum(len(b.prompts) for b in backends) == 10


def test_the_first_reply_in_a_chat_says_it_is_an_ai_clone(tmp_path, count_tokens):
    engine = fixed_engine(tmp_path, count_tokens)

    async def scenario(fake):
        fake.queue(dm("hi, is that you?"))
        await until(lambda: len(fake.sent()) == 3)
        fake.queue(dm("and now?"))
        fake.queue(group(f"@{BOT['username']} hello all", mention=True))
        await until(lambda: len(fake.sent()) == 8)
        await asyncio.sleep(0.2)

    fake = run(engine, scenario, Gate(Rules(), "Sam"))
    dm_texts = [m["text"] for m in fake.sent(chat_id=11)]
    assert "AI clone of Sam" in dm_texts[0] and dm_texts[1:] == ["hello", "there", "hello", "there"]
    group_texts = [m["text"] for m in fake.sent(chat_id=-500)]
    assert "AI clone of Sam" in group_texts[0] and group_texts[1:] == ["hello", "there"]


def test_an_update_is_confirmed_only_once_it_is_handled(tmp_path, count_tokens):
    """PTB's Updater confirms the updates it fetched at once, before any reply; here Telegram hears
    of an update once it is handled, so a process that dies mid-reply leaves it to the next. New
    messages still come in meanwhile, and the updates in hand cost a poll every REPOLL_S, not a
    busy loop."""
    backend = SlowFirstBackend(delays=[3.0, 0.0, 0.0, 0.0])
    engine = fixed_engine(tmp_path, count_tokens, backend)
    bea = {"id": 14, "is_bot": False, "first_name": "Bea"}

    async def scenario(fake):
        def polls() -> int:
            return sum(c.method == "getUpdates" for c in fake.calls)

        ids = [fake.queue(dm(text)) for text in ("one", "two", "three")]
        await until(lambda: len(backend.prompts) == 1)  # "one" is generating, the others wait
        before = polls()
        await asyncio.sleep(1.0)
        assert fake.confirmed == [] and fake.unconfirmed() == ids
        assert polls() - before <= 1.0 / REPOLL_S + 2
        other = fake.queue(dm("meanwhile", user=bea))
        await until(lambda: len(fake.sent(chat_id=14)) == 1)  # answered while "one" still runs
        assert len(fake.sent(chat_id=11)) == 0 and fake.unconfirmed() == [*ids, other]
        await until(lambda: len(fake.sent(chat_id=11)) == 3)
        await until(lambda: sorted(fake.confirmed) == sorted([*ids, other]))

    fake = run(engine, scenario, Gate(quiet(messages_per_minute=0), "Sam"))
    assert [m["text"] for m in fake.sent(chat_id=11)] == ["re: one", "re: two", "re: three"]
