"""`clone serve` as a real process: Telegram through the fake Bot API, then SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from bot.cli import main

from .fake_telegram import FakeTelegram
from .platform_helpers import until
from .test_telegram import dm

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
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "serve", "--base", str(tiny_base),
        "--adapters", str(tmp_path / "none"), cwd=REPO, env=env,
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
                lambda: fake._ws is not None and not fake._ws.closed, send, "hello from discord",
            )
        finally:
            await fake.stop()

    code, _, err = asyncio.run(scenario())
    assert code == 0, err
    assert "hello from discord" not in err and "FAKE.TOKEN.secret" not in err
