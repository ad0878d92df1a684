"""`clone serve` as a real process: Telegram through the fake Bot API, then SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from bot.cli import main

from .fake_telegram import FakeTelegram
from .test_telegram import dm, until

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


def test_serve_answers_on_telegram_and_stops_cleanly_on_sigterm(tiny_base, tmp_path):
    async def scenario():
        fake = FakeTelegram()
        await fake.start()
        env = {**os.environ, "TELEGRAM_TOKEN": fake.token, "TELEGRAM_BASE_URL": fake.base_url,
               "CLONE_MEMORY_FILE": str(tmp_path / "memory.json")}
        for name in ("REDIS_URL", "LLM_BASE_URL", "DISCORD_TOKEN"):
            env.pop(name, None)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.cli", "serve", "--base", str(tiny_base),
            "--adapters", str(tmp_path / "none"), cwd=REPO, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            await until(lambda: any(c.method == "getUpdates" for c in fake.calls), timeout=60)
            fake.queue(dm("hello from telegram"))
            await until(lambda: fake.sent("sendChatAction", 11), timeout=30)
            await until(lambda: "hello from telegram" in (tmp_path / "memory.json").read_text()
                        if (tmp_path / "memory.json").exists() else False, timeout=30)
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            await fake.stop()
        return proc.returncode, out.decode(), err.decode(), fake.token

    code, out, err, token = asyncio.run(scenario())
    assert token not in err and token not in out  # httpx would log it inside every URL
    assert code == 0, err
    assert "Serving Sam Rivera" in out
    assert "hello from telegram" not in err  # no message text in the logs
    assert "Stopping: finishing replies in flight" in err


def test_serve_answers_on_discord_through_the_configured_addresses(tiny_base, tmp_path):
    from .fake_discord import FakeDiscord
    from .test_discord import ANA, DM_CHANNEL

    async def scenario():
        fake = FakeDiscord()
        await fake.start()
        env = {**os.environ, "DISCORD_TOKEN": "FAKE.TOKEN.secret",
               "DISCORD_API_BASE": f"http://127.0.0.1:{fake.port}/api/v10",
               "DISCORD_GATEWAY_URL": f"ws://127.0.0.1:{fake.port}/gateway",
               "CLONE_MEMORY_FILE": str(tmp_path / "memory.json")}
        for name in ("REDIS_URL", "LLM_BASE_URL", "TELEGRAM_TOKEN"):
            env.pop(name, None)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.cli", "serve", "--base", str(tiny_base),
            "--adapters", str(tmp_path / "none"), cwd=REPO, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            await until(lambda: fake._ws is not None and not fake._ws.closed, timeout=60)
            await asyncio.sleep(0.5)  # READY handled
            await fake.push(fake.message("hello from discord", ANA, DM_CHANNEL))
            await until(lambda: fake.typing(DM_CHANNEL) > 0, timeout=30)
            await until(lambda: "hello from discord" in (tmp_path / "memory.json").read_text()
                        if (tmp_path / "memory.json").exists() else False, timeout=30)
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            await fake.stop()
        return proc.returncode, out.decode(), err.decode()

    code, _, err = asyncio.run(scenario())
    assert code == 0, err
    assert "hello from discord" not in err and "FAKE.TOKEN.secret" not in err
