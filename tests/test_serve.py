"""`clone serve` as a real process: Telegram through the fake Bot API, then SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from bot.gate import Gate
from bot.serve import PlatformSettings, SettingsError, serve
from cli.main import main
from cli.settings import load_settings

from .fake_telegram import FakeTelegram
from .platform_helpers import free_port, quiet, until
from .test_telegram import dm, fixed_engine

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
    assert "Stopping: finishing replies in flight" in err


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
