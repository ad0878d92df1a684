"""`clone serve`: one process serving the clone on every platform whose token is set.

One engine, one model and one memory are shared by the platforms. SIGTERM (what a platform
like Heroku, Railway or Fly sends on deploy) and Ctrl-C stop taking new messages, let the
replies in flight finish, and close cleanly; discord.py installs no SIGTERM handler of its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class SettingsError(ValueError):
    """A setting that is missing or wrong; the message names it."""


@dataclass(frozen=True)
class Settings:
    telegram_token: str | None
    telegram_base_url: str | None
    discord_token: str | None
    discord_api_base: str | None = None     # e.g. http://127.0.0.1:8080/api/v10
    discord_gateway_url: str | None = None  # e.g. ws://127.0.0.1:8080/gateway

    @classmethod
    def from_env(cls, platform: str | None = None) -> Settings:
        def get(name: str) -> str | None:
            value = os.environ.get(name, "").strip()
            return value or None

        settings = cls(
            get("TELEGRAM_TOKEN"), get("TELEGRAM_BASE_URL"), get("DISCORD_TOKEN"),
            get("DISCORD_API_BASE"), get("DISCORD_GATEWAY_URL"),
        )
        if platform == "telegram" and not settings.telegram_token:
            raise SettingsError("--platform telegram needs TELEGRAM_TOKEN")
        if platform == "discord" and not settings.discord_token:
            raise SettingsError("--platform discord needs DISCORD_TOKEN")
        if not settings.telegram_token and not settings.discord_token:
            raise SettingsError(
                "no platform to serve: set TELEGRAM_TOKEN and/or DISCORD_TOKEN (environment or .env)"
            )
        return settings


def load_dotenv(path: Path = Path(".env")) -> None:
    """KEY=VALUE lines from a .env file into the environment; real environment variables win."""
    if not path.is_file():
        return
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"{path}, line {lineno}: expected KEY=VALUE")
        os.environ.setdefault(key.strip(), value.strip().strip("'\""))


async def serve(engine, settings: Settings, platform: str | None = None) -> None:
    """Run until SIGTERM or SIGINT, then finish in-flight replies and shut down."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    telegram_app = None
    if settings.telegram_token and platform in (None, "telegram"):
        from bot.telegram import build_application

        telegram_app = build_application(settings.telegram_token, engine, settings.telegram_base_url)
        await telegram_app.initialize()
        await telegram_app.start()
        await telegram_app.updater.start_polling(drop_pending_updates=False)
        log.info("Telegram: polling")
    discord_client = discord_task = None
    if settings.discord_token and platform in (None, "discord"):
        discord_client = start_discord(engine, settings)
        discord_task = asyncio.create_task(discord_client.start(settings.discord_token))
        discord_task.add_done_callback(lambda t: stop.set())  # a failed login stops the process
        log.info("Discord: connecting")
    try:
        await stop.wait()
    finally:
        log.info("Stopping: finishing replies in flight")
        if discord_client is not None:
            await discord_client.close()
            if discord_task is not None and discord_task.done() and not discord_task.cancelled():
                error = discord_task.exception()
                if error is not None:
                    raise SettingsError(f"Discord: {type(error).__name__}: check DISCORD_TOKEN") from None
        if telegram_app is not None:
            await telegram_app.updater.stop()
            await telegram_app.stop()  # waits for the handlers still running
            await telegram_app.shutdown()


def start_discord(engine, settings: Settings):
    """The Discord client, pointed at DISCORD_API_BASE / DISCORD_GATEWAY_URL when those are set."""
    import discord
    import yarl

    from bot.discord_bot import build_client

    if settings.discord_api_base:
        discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
    if settings.discord_gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)
    return build_client(engine)
