"""`clone serve` as a real process: Telegram through the fake Bot API, then SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from bot.gate import Gate, RedisState
from bot.serve import PlatformSettings, SettingsError, check_credentials, serve
from cli.main import main
from cli.settings import load_settings

from .fake_telegram import FakeTelegram
from .platform_helpers import SlowFirstBackend, drop_redis_keys, free_port, quiet, until
from .test_telegram import ANA, dm, fixed_engine

REPO = Path(__file__).resolve().parent.parent


def test_serve_needs_a_platform_token(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)  # no .env here
    for name in ("TELEGRAM_TOKEN", "DISCORD_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert main(["serve"]) == 2
    assert "TELEGRAM_TOKEN" in capsys.readouterr().err
    (tmp_path / ".env").write_text("garbage line\n")
    monkeypatch.setenv("TELEGRAM_TOKEN", "1:x")
    assert main(["serve"]) == 2
    assert ".env, line 1" in capsys.readouterr().err


async def serve_until_remembered(tiny_base, tmp_path, platform_env: dict, ready, send, text: str):
    """Run `clone serve` as a process, wait until `ready()`, `send()`, wait until `text` is in its
    memory, then SIGTERM it. Returns (exit code, stdout, stderr)."""
    env = {**os.environ, **platform_env, "CLONE_MEMORY_FILE": str(tmp_path / "memory.json")}
    for name in ("REDIS_URL", "LLM_BASE_URL", "TELEGRAM_TOKEN", "DISCORD_TOKEN"):
        if name not in platform_env:
            env.pop(name, None)
    memory = tmp_path / "memory.json"
    persona = tmp_path / "sample"  # the sample's settings, without any adapter of the checkout's
    persona.mkdir(exist_ok=True)
    (persona / "persona.toml").write_bytes((REPO / "persona_data/sample/persona.toml").read_bytes())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "serve", "--base", str(tiny_base), "--persona", str(persona),
        cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        await until(ready, timeout=60)
        await send()
        await until(lambda: memory.exists() and text in memory.read_text(), timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


def test_serve_answers_on_telegram_and_stops_cleanly_on_sigterm(tiny_base, tmp_path):
    async def scenario():
        fake = FakeTelegram()
        await fake.start()

        async def send():
            fake.queue(dm("hello from telegram"))
            await until(lambda: fake.sent("sendChatAction", 11), timeout=30)

        try:
            return await serve_until_remembered(
                tiny_base, tmp_path, {"TELEGRAM_TOKEN": fake.token, "TELEGRAM_BASE_URL": fake.base_url},
                lambda: any(c.method == "getUpdates" for c in fake.calls), send, "hello from telegram",
            ), fake.token
        finally:
            await fake.stop()

    (code, out, err), token = asyncio.run(scenario())
    assert code == 0, err
    assert "Serving Sam Rivera" in out
    assert "hello from telegram" not in err  # no message text in the logs
    assert token not in err and token not in out  # httpx would log it inside every URL
    assert "Stopping: finishing the replies in progress" in err


def test_serve_answers_on_discord_through_the_configured_addresses(tiny_base, tmp_path):
    from .fake_discord import FakeDiscord
    from .test_discord import ANA, DM_CHANNEL

    async def scenario():
        fake = FakeDiscord()
        await fake.start()

        async def send():
            await asyncio.sleep(0.5)  # READY handled
            await fake.push(fake.message("hello from discord", ANA, DM_CHANNEL))
            await until(lambda: fake.typing(DM_CHANNEL) > 0, timeout=30)

        try:
            return await serve_until_remembered(
                tiny_base, tmp_path,
                {"DISCORD_TOKEN": "FAKE.TOKEN.secret",
                 "DISCORD_API_BASE": f"http://127.0.0.1:{fake.port}/api/v10",
                 "DISCORD_GATEWAY_URL": f"ws://127.0.0.1:{fake.port}/gateway"},
                lambda: fake.connected > 0, send, "hello from discord",
            )
        finally:
            await fake.stop()

    code, _, err = asyncio.run(scenario())
    assert code == 0, err
    assert "hello from discord" not in err and "FAKE.TOKEN.secret" not in err


# -- settings, refusals and the Telegram webhook, in this process -------------------------------


def settings_env(monkeypatch, **values: str) -> None:
    for name in ("TELEGRAM_TOKEN", "TELEGRAM_BASE_URL", "DISCORD_TOKEN", "TELEGRAM_WEBHOOK_URL",
                 "TELEGRAM_WEBHOOK_SECRET", "PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("values, error", [
    ({"PORT": "eighty"}, "PORT must be a port number"),
    ({"PORT": "70000"}, "PORT must be a port number"),
    ({"TELEGRAM_WEBHOOK_URL": "http://clone.example.com/hook"}, "must be a public https URL"),
    ({"TELEGRAM_WEBHOOK_URL": "clone.example.com/hook"}, "must be a public https URL"),
    ({"TELEGRAM_WEBHOOK_URL": "https://x.example/h", "TELEGRAM_WEBHOOK_SECRET": "no spaces"},
     "TELEGRAM_WEBHOOK_SECRET may hold only"),
])
def test_bad_serving_settings_are_named(monkeypatch, values, error):
    settings_env(monkeypatch, TELEGRAM_TOKEN="1:x", **values)
    with pytest.raises(SettingsError, match=error):
        load_settings()


@pytest.mark.parametrize("name, value", [
    ("TELEGRAM_TOKEN", "12:ab/../x"),   # PTB appended it to the URL path: a JSONDecodeError
    ("TELEGRAM_TOKEN", "12:ab?x=1"),
    ("TELEGRAM_TOKEN", "12:ab#frag"),
    ("TELEGRAM_TOKEN", "12:ab cd"),
    ("TELEGRAM_TOKEN", "abcdef"),
    ("TELEGRAM_TOKEN", "12:"),
    ("DISCORD_TOKEN", "Bot abc.def.ghi"),
    ("DISCORD_TOKEN", "abc/../def"),
    ("DISCORD_TOKEN", "abc?def"),
    ("DISCORD_TOKEN", '"abc.def"'),
])
def test_a_token_of_the_wrong_shape_is_named_and_never_echoed(monkeypatch, name, value):
    settings_env(monkeypatch, **{name: value})
    with pytest.raises(SettingsError) as e:
        load_settings()
    message = str(e.value)
    assert message.startswith(f"{name} ") and "\n" not in message
    assert value.strip('"') not in message


def test_a_token_of_the_wrong_shape_stops_serve_before_anything_loads(monkeypatch, tmp_path, capsys):
    settings_env(monkeypatch, TELEGRAM_TOKEN="12:ab/../x")
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--base", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert "TELEGRAM_TOKEN" in err and "ab/../x" not in err and "Traceback" not in err


def test_well_formed_tokens_pass(monkeypatch):
    settings_env(monkeypatch, TELEGRAM_TOKEN="123456789:AAH-x_9Zq", DISCORD_TOKEN="MTIz.GhIj-k.l_m")
    settings = load_settings()
    assert settings.secret("telegram_token") == "123456789:AAH-x_9Zq"
    assert settings.secret("discord_token") == "MTIz.GhIj-k.l_m"


def test_webhook_settings_and_the_derived_secret(monkeypatch):
    settings_env(monkeypatch, TELEGRAM_TOKEN="1:secret-token", PORT="9000",
                 TELEGRAM_WEBHOOK_URL="https://clone.example.com/telegram")
    settings = load_settings().platforms()
    assert settings.port == 9000 and settings.telegram_webhook_url.endswith("/telegram")
    secret = settings.webhook_secret()
    assert secret == load_settings().platforms().webhook_secret()  # the same in every process
    assert "secret-token" not in secret and len(secret) >= 32
    settings_env(monkeypatch, TELEGRAM_TOKEN="1:x", TELEGRAM_BASE_URL="http://127.0.0.1:1/bot",
                 TELEGRAM_WEBHOOK_URL="http://127.0.0.1:2/hook", TELEGRAM_WEBHOOK_SECRET="mine_1")
    assert load_settings().platforms().webhook_secret() == "mine_1"  # http: for a self-hosted Bot API


def test_a_bad_serve_table_fails_before_the_model_loads(monkeypatch, tmp_path, capsys):
    settings_env(monkeypatch, TELEGRAM_TOKEN="1:x")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "persona.toml").write_text('name = "Sam"\n[serve]\nowner = [12345]\n')
    assert main(["serve", "--persona", str(tmp_path), "--base", str(tmp_path / "no-model")]) == 2
    assert "persona.toml [serve]: `owner[0]` is 12345" in capsys.readouterr().err


def test_telegram_webhook_mode_answers_only_telegram(tmp_path, count_tokens):
    """Webhook mode: the bot registers its URL and secret with the Bot API, then answers the
    updates POSTed to it, and refuses a POST without the secret."""
    import aiohttp

    engine = fixed_engine(tmp_path, count_tokens)
    port = free_port()

    async def scenario():
        fake = FakeTelegram()
        await fake.start()
        settings = PlatformSettings(fake.token, fake.base_url, None,
                            telegram_webhook_url=f"http://127.0.0.1:{port}/tg-hook", port=port)
        stop = asyncio.Event()
        task = asyncio.create_task(serve(engine, settings, gate=Gate(quiet(), "Sam"), stop=stop))
        try:
            await until(lambda: bool(fake.sent("setWebhook")), timeout=20)
            hook = fake.sent("setWebhook")[0]
            update = {"update_id": 1, "message": dm("hello over the webhook")}
            url = f"http://127.0.0.1:{port}/tg-hook"
            async with aiohttp.ClientSession() as http:
                await until_listening(http, url)
                forged = await http.post(url, json={**update, "update_id": 2},
                                         headers={"X-Telegram-Bot-Api-Secret-Token": "guess"})
                real = await http.post(url, json=update,
                                       headers={"X-Telegram-Bot-Api-Secret-Token": hook["secret_token"]})
            await until(lambda: len(fake.sent()) == 2)
            await asyncio.sleep(0.3)
            return hook, forged.status, real.status, fake
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
            await fake.stop()

    hook, forged, real, fake = asyncio.run(scenario())
    assert hook["url"] == f"http://127.0.0.1:{port}/tg-hook"
    assert hook["secret_token"] == PlatformSettings(fake.token, None, None).webhook_secret()
    assert forged == 403 and real == 200
    assert [m["text"] for m in fake.sent()] == ["hello", "there"]  # the forged update was not answered
    assert not any(c.method == "getUpdates" for c in fake.calls)
    menu = json.loads(fake.sent("setMyCommands")[0]["commands"])
    assert [c["command"] for c in menu] == ["reset", "forget", "help", "about"]


async def until_listening(http, url: str) -> None:
    import aiohttp

    for _ in range(100):
        try:
            async with http.get(url) as response:  # the webhook answers GET with 405
                if response.status:
                    return
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"nothing listens at {url}")


def test_user_account_tokens_are_refused_on_both_platforms(tmp_path, count_tokens, monkeypatch):
    from .fake_discord import FakeDiscord
    from .test_discord import ANA

    engine = fixed_engine(tmp_path, count_tokens)

    async def scenario():
        telegram = FakeTelegram(me={"id": 5, "is_bot": False, "first_name": "A person"})
        discord_fake = FakeDiscord(me={**ANA, "bot": False})
        await telegram.start()
        await discord_fake.start()
        try:
            with pytest.raises(SettingsError, match="TELEGRAM_TOKEN belongs to a user account"):
                await serve(engine, PlatformSettings(telegram.token, telegram.base_url, None))
            discord_settings = PlatformSettings(
                None, None, "FAKE.TOKEN.secret",
                discord_api_base=f"http://127.0.0.1:{discord_fake.port}/api/v10",
                discord_gateway_url=f"ws://127.0.0.1:{discord_fake.port}/gateway")
            with pytest.raises(SettingsError, match="DISCORD_TOKEN belongs to a user account"):
                await asyncio.wait_for(serve(engine, discord_settings), 20)
        finally:
            await telegram.stop()
            await discord_fake.stop()
        return telegram, discord_fake

    import discord

    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)  # serve() repoints them
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY",
                        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
    telegram, discord_fake = asyncio.run(scenario())
    assert telegram.sent() == [] and not any(c.method == "getUpdates" for c in telegram.calls)
    assert discord_fake.connected == 0 and discord_fake.sent() == []


def test_settings_come_from_both_env_files_and_the_environment_wins(monkeypatch, tmp_path):
    settings_env(monkeypatch)
    monkeypatch.delenv("LLM_MODEL", raising=False)
    here, persona = tmp_path / ".env", tmp_path / "persona.env"
    here.write_text("TELEGRAM_TOKEN=1:from-here  # my test bot\nLLM_MODEL=here\nPORT=9001\n")
    persona.write_text("export LLM_MODEL='persona one'\nDISCORD_TOKEN=\n")
    settings = load_settings(here, persona, tmp_path / "missing.env")
    assert settings.secret("telegram_token") == "1:from-here"  # the inline comment is not the value
    assert settings.llm_model == "persona one"  # the persona's file wins over the current folder's
    assert settings.discord_token is None and settings.port == 9001
    assert "from-here" not in repr(settings) and "from-here" not in str(settings)  # secrets stay hidden
    monkeypatch.setenv("LLM_MODEL", "from-env")
    assert load_settings(here, persona).llm_model == "from-env"


def test_the_env_example_is_a_valid_env_file_of_known_settings(monkeypatch, tmp_path):
    from cli.settings import Settings, check_env_file

    example = REPO / ".env.example"
    check_env_file(example)
    named = {line.lstrip("# ").split("=", 1)[0] for line in example.read_text().splitlines()
             if "=" in line and line.lstrip("# ")[:1].isupper()}
    names = {n.strip() for part in named for n in part.split("/")}
    assert names and names <= {f.upper() for f in Settings.model_fields}, names - {
        f.upper() for f in Settings.model_fields}
    assert {f.upper() for f in Settings.model_fields} <= names  # every setting is documented there


# -- credentials checked before the model loads; an unreachable API retried, then named --------


def fast_retry(**values) -> dict:
    """Connection retries short enough for a test: 3 attempts, 0.1 s then 0.2 s apart."""
    return {"connect_attempts": 3, "connect_wait_s": 0.1, **values}


def test_an_unreachable_telegram_api_is_retried_then_named_in_one_line(tmp_path, count_tokens):
    engine = fixed_engine(tmp_path, count_tokens)
    settings = PlatformSettings("123:TEST", f"http://127.0.0.1:{free_port()}/bot", None, **fast_retry())

    async def scenario():
        started = time.monotonic()
        with pytest.raises(SettingsError) as checked:
            await check_credentials(settings, "telegram")
        took = time.monotonic() - started
        with pytest.raises(SettingsError) as served:  # serve() itself, as without the check first
            await asyncio.wait_for(serve(engine, settings, "telegram"), 20)
        return took, str(checked.value), str(served.value)

    took, checked, served = asyncio.run(scenario())
    assert took >= 0.3  # waited between the attempts
    for message in (checked, served):
        assert "Telegram Bot API" in message and "TELEGRAM_BASE_URL" in message
        assert "123:TEST" not in message and "\n" not in message


def test_an_address_that_is_no_platform_api_is_one_line(monkeypatch):
    """A web page where the API should be (a typo in TELEGRAM_BASE_URL or DISCORD_API_BASE)."""
    import discord
    from aiohttp import web

    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)  # repointed below

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html>hi</html>", content_type="text/html")

    async def scenario():
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", page)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        messages = []
        try:
            for settings in (PlatformSettings("123:TEST", f"http://127.0.0.1:{port}/bot", None),
                             PlatformSettings(None, None, "FAKE.TOKEN.x", f"http://127.0.0.1:{port}/api")):
                with pytest.raises(SettingsError) as e:
                    await check_credentials(settings)
                messages.append(str(e.value))
            return messages
        finally:
            await runner.cleanup()

    telegram, discord_message = asyncio.run(scenario())
    assert "does not answer like the Telegram Bot API" in telegram and "TELEGRAM_BASE_URL" in telegram
    assert "does not answer like the Discord API" in discord_message
    assert "DISCORD_API_BASE" in discord_message
    for message in (telegram, discord_message):
        assert "TEST" not in message and "FAKE" not in message and "html" not in message


def test_a_telegram_api_that_comes_back_during_the_retries_is_used():
    port = free_port()

    async def scenario():
        fake = FakeTelegram(port=port)
        settings = PlatformSettings(fake.token, fake.base_url, None, **fast_retry(connect_wait_s=0.3))
        check = asyncio.create_task(check_credentials(settings, "telegram"))
        await asyncio.sleep(0.1)  # the first attempt has failed
        await fake.start()
        try:
            await asyncio.wait_for(check, 10)
        finally:
            await fake.stop()
        return fake

    fake = asyncio.run(scenario())
    assert not any(c.method == "getUpdates" for c in fake.calls)  # nothing was served


def test_bad_and_user_account_tokens_fail_fast_before_anything_else(monkeypatch):
    """`check_credentials` is what `clone serve` calls before the model loads (about 17 s): a
    wrong token costs a second, not the load."""
    import discord

    from .fake_discord import FakeDiscord
    from .test_discord import ANA

    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)  # repointed below

    async def refused(settings: PlatformSettings, platform: str | None = None) -> str:
        started = time.monotonic()
        with pytest.raises(SettingsError) as e:
            await check_credentials(settings, platform)
        assert time.monotonic() - started < 3
        return str(e.value)

    async def scenario():
        telegram, user = FakeTelegram(), FakeTelegram(me={"id": 5, "is_bot": False, "first_name": "A"})
        discord_fake = FakeDiscord(token="FAKE.TOKEN.secret")
        discord_user = FakeDiscord(me={**ANA, "bot": False})
        for fake in (telegram, user, discord_fake, discord_user):
            await fake.start()
        try:
            api = f"http://127.0.0.1:{discord_fake.port}/api/v10"
            user_api = f"http://127.0.0.1:{discord_user.port}/api/v10"
            good = PlatformSettings(telegram.token, telegram.base_url, "FAKE.TOKEN.secret", api)
            await check_credentials(good)  # both accepted
            messages = [
                await refused(PlatformSettings("123:WRONG", telegram.base_url, None), "telegram"),
                await refused(PlatformSettings(user.token, user.base_url, None)),
                await refused(PlatformSettings(None, None, "WRONG.TOKEN.x", api), "discord"),
                await refused(PlatformSettings(None, None, "FAKE.TOKEN.secret", user_api)),
                # --platform discord: the Telegram token is not even tried
                await refused(PlatformSettings("123:WRONG", telegram.base_url, "WRONG.TOKEN.x", api),
                              "discord"),
            ]
        finally:
            for fake in (telegram, user, discord_fake, discord_user):
                await fake.stop()
        return messages, telegram, discord_fake

    messages, telegram, discord_fake = asyncio.run(scenario())
    assert "Telegram refused TELEGRAM_TOKEN" in messages[0]
    assert "TELEGRAM_TOKEN belongs to a user account" in messages[1]
    assert "Discord refused DISCORD_TOKEN" in messages[2] and "Discord refused" in messages[4]
    assert "DISCORD_TOKEN belongs to a user account" in messages[3]
    assert not any("WRONG" in m or "secret" in m for m in messages)
    assert {c.method for c in telegram.calls} == {"getMe"}  # nothing polled, nothing sent
    assert {(c.method, c.path) for c in discord_fake.calls} == {("GET", "/users/@me")}
    assert discord_fake.connected == 0


# -- stopping: the reply in progress gets the grace, the rest is handed over ---------------------

REDIS_URL = "redis://127.0.0.1:6379/0"
BEA = {"id": 14, "is_bot": False, "first_name": "Bea"}
STOPS = pytest.mark.parametrize("grace_s, generation_s, in_progress_sent", [
    (5.0, 1.0, True),    # the replies being generated fit the grace
    (0.3, 30.0, False),  # they do not: cancelled, and handed over too
], ids=["finishes", "grace-runs-out"])


def seen_claims(persona: str) -> dict[str, str]:
    """The gate's claims on messages in the shared Redis: key's last parts -> holder."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        return {k.decode().split(":seen:")[1]: client.get(k).decode()
                for k in client.scan_iter(f"clone:{persona}:seen:*")}
    finally:
        client.close()


async def stop_mid_reply(fake, engine, settings: PlatformSettings, started, send, generating):
    """Start `fake`; serve() on it until `started()`, `await send()`, until `generating()`; then
    stop. (What send() returned, the seconds serve() took to return once stopped, the claims left.)"""
    persona = f"serve-test-{uuid.uuid4().hex}"
    await fake.start()
    gate = Gate(quiet(messages_per_minute=0), persona, RedisState(REDIS_URL))
    stop = asyncio.Event()
    try:
        task = asyncio.create_task(serve(engine, settings(fake), gate=gate, stop=stop))
        await until(started, timeout=20)
        sent = await send()
        await until(generating, timeout=20)
        stop.set()
        stopped = time.monotonic()
        await asyncio.wait_for(task, 40)
        return sent, time.monotonic() - stopped, seen_claims(persona)
    finally:
        await gate.close()
        await fake.stop()
        drop_redis_keys(persona)


@STOPS
def test_telegram_stop_finishes_what_is_in_progress_and_hands_over_the_rest(
        tmp_path, count_tokens, grace_s, generation_s, in_progress_sent):
    backend = SlowFirstBackend(delays=[generation_s] * 4)
    engine, fake = fixed_engine(tmp_path, count_tokens, backend), FakeTelegram()

    async def send() -> list[int]:
        return [fake.queue(dm(text, user=user)) for text in ("first", "second") for user in (ANA, BEA)]

    ids, took, claims = asyncio.run(stop_mid_reply(
        fake, engine, lambda f: PlatformSettings(f.token, f.base_url, None, stop_grace_s=grace_s),
        lambda: any(c.method == "getUpdates" for c in fake.calls), send,
        lambda: len(backend.prompts) == 2))  # each chat's first message
    first, second = ids[:2], ids[2:]
    assert took < (generation_s if in_progress_sent else grace_s) + 1.0
    if in_progress_sent:
        assert [m["text"] for m in fake.sent()] == ["re: first", "re: first"]
        assert sorted(fake.confirmed) == first and fake.unconfirmed() == second
        answered = [fake.queued[u]["message"] for u in first]
        assert claims == {f"telegram:{m['chat']['id']}:{m['message_id']}": "answered" for m in answered}
    else:
        assert fake.sent() == [] and fake.confirmed == [] and fake.unconfirmed() == ids
        assert claims == {}  # released: the next process answers them


@STOPS
def test_discord_stop_finishes_what_is_in_progress_and_hands_over_the_rest(
        tmp_path, count_tokens, monkeypatch, grace_s, generation_s, in_progress_sent):
    import discord

    from .fake_discord import FakeDiscord
    from .test_discord import ANA as DISCORD_ANA
    from .test_discord import DM_CHANNEL

    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)  # serve() repoints them
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY",
                        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
    backend = SlowFirstBackend(delays=[generation_s] * 2)
    engine, fake = fixed_engine(tmp_path, count_tokens, backend), FakeDiscord()

    async def send() -> list[dict]:
        messages = [fake.message(t, DISCORD_ANA, DM_CHANNEL) for t in ("first", "second")]
        for message in messages:
            await fake.push(message)
        return messages

    messages, took, claims = asyncio.run(stop_mid_reply(
        fake, engine,
        lambda f: PlatformSettings(None, None, "FAKE.TOKEN.secret", f"http://127.0.0.1:{f.port}/api/v10",
                                   f"ws://127.0.0.1:{f.port}/gateway", stop_grace_s=grace_s),
        lambda: fake.identified.is_set() and fake.connected > 0, send, lambda: len(backend.prompts) == 1))
    assert took < (generation_s if in_progress_sent else grace_s) + 1.0
    if in_progress_sent:
        assert [m["content"] for m in fake.sent(DM_CHANNEL)] == ["re: first"]
        assert claims == {f"discord:{DM_CHANNEL}:{messages[0]['id']}": "answered"}
    else:  # released, for a process that received it too (Discord does not deliver it again)
        assert fake.sent(DM_CHANNEL) == [] and claims == {}


def test_clone_serve_checks_the_token_before_it_loads_a_model(tmp_path):
    """A wrong token is the first thing `clone serve` reports: the base model given here does not
    even exist, and loading it would have been the error otherwise (after ~17 s with a real one)."""
    persona = tmp_path / "sam"
    persona.mkdir()
    (persona / "persona.toml").write_text('name = "Sam"\n')

    async def scenario():
        fake = FakeTelegram()
        await fake.start()
        try:
            env = {**os.environ, "TELEGRAM_TOKEN": "123:WRONG", "TELEGRAM_BASE_URL": fake.base_url}
            for name in ("DISCORD_TOKEN", "REDIS_URL", "LLM_BASE_URL", "TELEGRAM_WEBHOOK_URL"):
                env.pop(name, None)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cli", "serve", "--persona", str(persona),
                "--base", str(tmp_path / "no-model"), cwd=REPO, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
            return proc.returncode, err.decode(), fake
        finally:
            await fake.stop()

    code, err, fake = asyncio.run(scenario())
    assert code == 2 and "Telegram refused TELEGRAM_TOKEN" in err, err
    assert "no-model" not in err and "Traceback" not in err and "123:WRONG" not in err
    assert not any(c.method == "getUpdates" for c in fake.calls)  # nothing was served
