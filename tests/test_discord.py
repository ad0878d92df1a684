"""The real discord.py Client, connected to a local fake Discord, in front of a real Engine."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

from bot.discord_bot import SelfBotRefused, build_client
from bot.engine import Engine
from bot.gate import RATE_LIMIT_REPLY, Gate, RedisState, Rules
from bot.memory import EmbeddedMemory
from tests.fake_discord import BOT, FakeDiscord
from tests.platform_helpers import FixedBackend, SlowFirstBackend, drop_redis_keys, quiet, until
from training.persona import Persona

PERSONA = Persona(name="Sam", description="Texts in short bursts.")
TOKEN = "FAKE.TOKEN.secret"
ANA = {"id": "111111111111111111", "username": "ana", "discriminator": "0",
       "global_name": "Ana", "avatar": None}
OTHER_BOT = {**ANA, "id": "222222222222222222", "username": "otherbot", "bot": True}
DM_CHANNEL = "300000000000000001"
GUILD = "400000000000000001"
GUILD_CHANNEL = "400000000000000002"
ME = f"<@{BOT['id']}>"


def run(engine: Engine, monkeypatch, scenario, gate: Gate | None = None) -> FakeDiscord:
    """Start the fake and the real Client, run `scenario(fake)`, close both cleanly."""
    fake = FakeDiscord()

    async def main():
        await fake.start()
        fake.patch(monkeypatch)
        client = build_client(engine, gate or Gate(quiet(), engine.persona.name),
                              guild_ready_timeout=0.05)
        task = asyncio.create_task(client.start(TOKEN))
        try:
            await until(client.is_ready)  # READY seen, on_ready dispatched
            await scenario(fake)
        finally:
            await client.close()
            await asyncio.wait_for(task, 10)
            await fake.stop()

    asyncio.run(main())
    return fake


def fixed_engine(tmp_path, count_tokens, backend=None) -> Engine:
    return Engine(PERSONA, backend or FixedBackend(), EmbeddedMemory(tmp_path / "m.json"),
                  count_tokens)


def replies(fake: FakeDiscord, channel: str) -> list[str]:
    return [m["content"] for m in fake.sent(channel)]


def test_a_dm_gets_each_message_in_order_with_no_pings(tmp_path, count_tokens, monkeypatch,
                                                         caplog):
    caplog.set_level(logging.DEBUG)
    secret = "my very private words"

    async def scenario(fake):
        await fake.push(fake.message(secret, ANA, DM_CHANNEL))
        await until(lambda: len(fake.sent(DM_CHANNEL)) == 2)
        await asyncio.sleep(0.2)  # nothing more follows

    fake = run(fixed_engine(tmp_path, count_tokens), monkeypatch, scenario)
    assert replies(fake, DM_CHANNEL) == ["hello", "there"]
    assert len(fake.sent()) == 2
    for body in fake.sent(DM_CHANNEL):
        assert body["allowed_mentions"]["parse"] == []
        assert body["allowed_mentions"].get("users", []) == []
        assert body["allowed_mentions"].get("roles", []) == []
    assert fake.typing(DM_CHANNEL) >= 1
    assert [c.path for c in fake.calls[:2]] == ["/users/@me", "/oauth2/applications/@me"]
    assert secret not in caplog.text and TOKEN not in caplog.text
    assert f"channel={DM_CHANNEL}" in caplog.text


def test_guild_needs_a_mention_or_a_reply_and_bots_are_ignored(tmp_path, count_tokens,
                                                                 monkeypatch):
    backend = FixedBackend()

    async def scenario(fake):
        await fake.push(fake.message("just chatting", ANA, GUILD_CHANNEL, GUILD))
        await fake.push(fake.message(f"{ME} hi", OTHER_BOT, GUILD_CHANNEL, GUILD,
                                     mentions=[BOT]))
        await fake.push(fake.message("hi", OTHER_BOT, DM_CHANNEL))
        await asyncio.sleep(0.5)
        assert fake.sent() == []
        await fake.push(fake.message(f"{ME}   how are you", ANA, GUILD_CHANNEL, GUILD,
                                     mentions=[BOT]))
        await until(lambda: len(fake.sent()) == 2)
        mine = fake.message("earlier", BOT, GUILD_CHANNEL, GUILD)
        await fake.push(fake.message("and then?", ANA, GUILD_CHANNEL, GUILD, referenced=mine))
        await until(lambda: len(fake.sent()) == 4)
        await asyncio.sleep(0.2)

    fake = run(fixed_engine(tmp_path, count_tokens, backend), monkeypatch, scenario)
    assert replies(fake, GUILD_CHANNEL) == ["hello", "there", "hello", "there"]
    assert len(backend.prompts) == 2
    # the mention is stripped from what the model sees
    assert backend.prompts[0][-1]["content"].endswith("how are you")
    assert "<@" not in backend.prompts[0][-1]["content"]
    assert "and then?" in backend.prompts[1][-1]["content"]
    assert fake.typing(GUILD_CHANNEL) >= 2


def test_commands_about_help_reset_forget(tmp_path, count_tokens, monkeypatch):
    backend = FixedBackend()
    engine = fixed_engine(tmp_path, count_tokens, backend)

    async def scenario(fake):
        await fake.push(fake.message("/about", ANA, DM_CHANNEL))
        await until(lambda: len(fake.sent()) == 1)
        await fake.push(fake.message("/help", ANA, DM_CHANNEL))
        await until(lambda: len(fake.sent()) == 2)
        await fake.push(fake.message("remember me", ANA, DM_CHANNEL))
        await until(lambda: len(fake.sent()) == 4)
        await fake.push(fake.message("/forget", ANA, DM_CHANNEL))
        await until(lambda: len(fake.sent()) == 5)
        await fake.push(fake.message(f"{ME} /reset", ANA, GUILD_CHANNEL, GUILD, mentions=[BOT]))
        await until(lambda: len(fake.sent()) == 6)

    fake = run(engine, monkeypatch, scenario)
    about, help_, _, _, forget = replies(fake, DM_CHANNEL)
    assert "AI clone of Sam" in about and "not Sam in person" in about
    assert "/reset" in help_ and "/forget" in help_ and "in a DM" in help_ and "every channel" in help_
    assert forget == "Done: removed 1 of your messages from my memory."
    assert replies(fake, GUILD_CHANNEL) == ["Okay, fresh start: I've forgotten this channel."]
    assert len(backend.prompts) == 1  # commands never reach the model


def test_a_long_reply_is_split_at_2000_characters(tmp_path, count_tokens, monkeypatch):
    # The engine caps its own messages (postprocess), so a reply this long is handed to the
    # adapter directly: what is under test is the adapter's split at Discord's limit.
    long = " ".join(["word"] * 500)  # 2,499 characters, one line
    engine = fixed_engine(tmp_path, count_tokens)

    async def handle(incoming):
        return [long, "short"]

    engine.handle = handle

    async def scenario(fake):
        await fake.push(fake.message("tell me everything", ANA, DM_CHANNEL))
        await until(lambda: len(fake.sent()) == 3)
        await asyncio.sleep(0.2)

    fake = run(engine, monkeypatch, scenario)
    first, second, third = replies(fake, DM_CHANNEL)
    assert len(long) == 2499
    assert len(first) <= 2000 and len(second) <= 2000
    assert f"{first} {second}" == long
    assert third == "short"


def test_forbidden_sends_and_engine_errors_are_logged_not_fatal(tmp_path, count_tokens,
                                                                 monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    engine = fixed_engine(tmp_path, count_tokens)
    real, calls = engine.handle, []

    async def handle(incoming):
        calls.append(incoming)
        if incoming.text == "explode":
            raise RuntimeError("secret detail")
        return await real(incoming)

    engine.handle = handle

    async def scenario(fake):
        fake.forbid_next_sends, fake.forbid_typing = 1, True  # typing refused: still answered
        await fake.push(fake.message("first", ANA, DM_CHANNEL))
        await until(lambda: any(c.method == "POST" and c.path.endswith("/messages")
                                for c in fake.calls))
        await fake.push(fake.message("explode", ANA, DM_CHANNEL))
        await until(lambda: len(calls) == 2)
        await fake.push(fake.message("still there?", ANA, DM_CHANNEL))
        await until(lambda: len(fake.sent()) == 3)  # the forbidden one + two answers
        await asyncio.sleep(0.2)

    fake = run(engine, monkeypatch, scenario)
    # the 403 ended the first reply after its first piece; the last message was answered whole
    assert replies(fake, DM_CHANNEL) == ["hello", "hello", "there"]
    assert fake.typing(DM_CHANNEL) == 3  # tried (and refused) before each of the 3 generations
    assert f"forbidden channel={DM_CHANNEL}" in caplog.text
    assert "discord error event=on_message error=RuntimeError" in caplog.text
    assert "secret detail" not in caplog.text and "still there?" not in caplog.text


BEA = {**ANA, "id": "333333333333333333", "username": "bea", "global_name": "Bea"}


def test_servers_channels_users_the_owner_and_the_rate_limit(tmp_path, count_tokens, monkeypatch):
    other_guild, other_channel = "500000000000000001", "500000000000000002"
    open_channel = "400000000000000009"
    rules = quiet(owner=frozenset({f"discord:{BEA['id']}"}),
                  block_servers=frozenset({f"discord:{other_guild}"}),
                  reply_in=frozenset({f"discord:{open_channel}"}), messages_per_minute=1)
    backend = FixedBackend("hi")

    async def scenario(fake):
        await fake.push(fake.message(f"{ME} hello", ANA, other_channel, other_guild, mentions=[BOT]))
        await fake.push(fake.message("no mention needed here", ANA, open_channel, GUILD))
        await until(lambda: len(fake.sent(open_channel)) == 1)
        await fake.push(fake.message("and again", ANA, open_channel, GUILD))
        await fake.push(fake.message("and again!", ANA, open_channel, GUILD))
        await until(lambda: len(fake.sent(open_channel)) == 2)
        for i in range(3):
            await fake.push(fake.message(f"owner {i}", BEA, open_channel, GUILD))
        await until(lambda: len(fake.sent(open_channel)) == 5)
        await asyncio.sleep(0.3)

    fake = run(fixed_engine(tmp_path, count_tokens, backend), monkeypatch, scenario, Gate(rules, "Sam"))
    assert fake.sent(other_channel) == []  # a blocked server
    assert replies(fake, open_channel) == ["hi", RATE_LIMIT_REPLY, "hi", "hi", "hi"]
    first = fake.sent(open_channel)[0]
    assert first["message_reference"]["fail_if_not_exists"] is False  # quotes what it answers
    assert "message_reference" in fake.sent(open_channel)[2]
    assert len(backend.prompts) == 4


def test_one_channel_keeps_its_order_and_never_holds_up_another(tmp_path, count_tokens, monkeypatch):
    backend = SlowFirstBackend(delays=[1.0, 0.4, 0.0, 0.0])
    other_dm = "300000000000000002"

    async def scenario(fake):
        for text in ("one", "two", "three"):
            await fake.push(fake.message(text, ANA, DM_CHANNEL))
        await fake.push(fake.message("other channel", BEA, other_dm))
        await until(lambda: len(fake.sent(DM_CHANNEL)) == 3)
        await asyncio.sleep(0.2)

    fake = run(fixed_engine(tmp_path, count_tokens, backend), monkeypatch, scenario,
               Gate(quiet(messages_per_minute=0), "Sam"))
    assert replies(fake, DM_CHANNEL) == ["re: one", "re: two", "re: three"]
    order = [c.path for c in fake.calls if c.method == "POST" and c.path.endswith("/messages")]
    assert order.index(f"/channels/{other_dm}/messages") < order.index(f"/channels/{DM_CHANNEL}/messages")


def test_two_connected_processes_answer_each_message_once(tmp_path, count_tokens, monkeypatch):
    """Discord sends every event to every gateway session: during a deploy the old and the new
    process both see each message, and the gate's Redis claim lets one of them answer it."""
    persona = f"dc-test-{uuid.uuid4().hex}"
    backends = [FixedBackend("from one"), FixedBackend("from the other")]
    fake = FakeDiscord()

    async def main():
        await fake.start()
        fake.patch(monkeypatch)
        clients, tasks, gates = [], [], []
        for i, backend in enumerate(backends):
            gate = Gate(quiet(messages_per_minute=0), persona, RedisState("redis://127.0.0.1:6379/0"))
            engine = Engine(PERSONA, backend, EmbeddedMemory(tmp_path / f"m{i}.json"), count_tokens)
            client = build_client(engine, gate, guild_ready_timeout=0.05)
            tasks.append(asyncio.create_task(client.start(TOKEN)))
            clients.append(client)
            gates.append(gate)
        try:
            await until(lambda: all(c.is_ready() for c in clients) and fake.connected == 2)
            for n in range(10):
                await fake.push(fake.message(f"message {n}", ANA, DM_CHANNEL))
            await until(lambda: len(fake.sent()) == 10)
            await asyncio.sleep(0.5)  # and nothing more follows
        finally:
            for client, task, gate in zip(clients, tasks, gates, strict=True):
                await client.close()
                await asyncio.wait_for(task, 10)
                await gate.close()
            await fake.stop()
            drop_redis_keys(persona)

    asyncio.run(main())
    assert len(fake.sent()) == 10
    assert sum(len(b.prompts) for b in backends) == 10


def test_a_user_account_token_is_refused(tmp_path, count_tokens, monkeypatch):
    fake = FakeDiscord(me={**ANA, "bot": False})

    async def main():
        await fake.start()
        fake.patch(monkeypatch)
        client = build_client(fixed_engine(tmp_path, count_tokens), guild_ready_timeout=0.05)
        try:
            with pytest.raises(SelfBotRefused, match="user account"):
                await asyncio.wait_for(client.start(TOKEN), 10)
        finally:
            await client.close()
            await fake.stop()

    asyncio.run(main())
    assert fake.connected == 0  # refused before the gateway: it never came online as the user
    assert fake.sent() == []


def test_a_dropped_gateway_connection_is_resumed(tmp_path, count_tokens, monkeypatch):
    async def scenario(fake):
        await fake.push(fake.message("before", ANA, DM_CHANNEL))
        await until(lambda: len(fake.sent()) == 2)
        await fake.drop_connections()
        await until(lambda: fake.resumed == 1 and fake.connected == 1, timeout=20)
        await fake.push(fake.message("after", ANA, DM_CHANNEL))
        await until(lambda: len(fake.sent()) == 4)

    fake = run(fixed_engine(tmp_path, count_tokens), monkeypatch, scenario)
    assert replies(fake, DM_CHANNEL) == ["hello", "there"] * 2


def test_slash_commands_are_registered_and_answered(tmp_path, count_tokens, monkeypatch):
    memory = EmbeddedMemory(tmp_path / "m.json")
    engine = Engine(PERSONA, FixedBackend(), memory, count_tokens)
    blocked = {**BEA, "id": "444444444444444444"}
    gate = Gate(quiet(block_users=frozenset({f"discord:{blocked['id']}"})), "Sam")

    async def scenario(fake):
        assert {c["name"] for c in fake.commands} == {"reset", "forget", "help", "about"}
        await fake.push(fake.message("remember me", ANA, DM_CHANNEL))
        await until(lambda: len(fake.sent()) == 2)
        await fake.push_interaction(fake.interaction("forget", ANA, DM_CHANNEL))
        await until(lambda: len(fake.interaction_replies()) == 1)
        await fake.push_interaction(fake.interaction("about", ANA, GUILD_CHANNEL, GUILD))
        await fake.push_interaction(fake.interaction("reset", blocked, GUILD_CHANNEL, GUILD))
        await until(lambda: len(fake.interaction_replies()) == 3)

    fake = run(engine, monkeypatch, scenario, gate)
    forget, *others = (r["data"] for r in fake.interaction_replies())
    about, refused = sorted(others, key=lambda d: "Sorry" in d["content"])  # these two raced
    assert forget["content"] == "Done: removed 1 of your messages from my memory."
    assert forget["flags"] & 64  # ephemeral: only the caller sees it
    assert "AI clone of Sam" in about["content"] and not about.get("flags", 0) & 64
    assert refused["content"] == "Sorry, I can't talk here." and refused["flags"] & 64
    assert all(r["data"]["allowed_mentions"]["parse"] == [] for r in fake.interaction_replies())


def test_the_first_reply_in_a_channel_says_it_is_an_ai_clone(tmp_path, count_tokens, monkeypatch):
    async def scenario(fake):
        await fake.push(fake.message("hi, is that you?", ANA, DM_CHANNEL))
        await until(lambda: len(fake.sent()) == 3)
        await fake.push(fake.message("and now?", ANA, DM_CHANNEL))
        await until(lambda: len(fake.sent()) == 5)
        await asyncio.sleep(0.2)

    fake = run(fixed_engine(tmp_path, count_tokens), monkeypatch, scenario, Gate(Rules(), "Sam"))
    texts = replies(fake, DM_CHANNEL)
    assert "AI clone of Sam" in texts[0] and texts[1:] == ["hello", "there", "hello", "there"]
