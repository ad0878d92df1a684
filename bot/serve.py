"""`clone serve`: one process serving the clone on every platform whose token is set.

One engine, one model and one memory are shared by the platforms. SIGTERM (what a platform
like Heroku, Railway or Fly sends on deploy) and Ctrl-C stop taking new messages, let the
replies in flight finish, and close cleanly; discord.py installs no SIGTERM handler of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bot.gate import Gate

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
    # Telegram webhook mode (else long polling): Telegram POSTs updates to this public URL, which
    # the platform routes to PORT here; the secret proves a request comes from Telegram.
    telegram_webhook_url: str | None = None
    port: int = 8080
    telegram_webhook_secret: str | None = None

    @classmethod
    def from_env(cls, platform: str | None = None) -> Settings:
        def get(name: str) -> str | None:
            value = os.environ.get(name, "").strip()
            return value or None

        port = get("PORT") or "8080"
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError(f"PORT must be a port number (1-65535), not {port!r}")
        settings = cls(
            get("TELEGRAM_TOKEN"), get("TELEGRAM_BASE_URL"), get("DISCORD_TOKEN"),
            get("DISCORD_API_BASE"), get("DISCORD_GATEWAY_URL"), get("TELEGRAM_WEBHOOK_URL"),
            int(port), get("TELEGRAM_WEBHOOK_SECRET"),
        )
        if platform == "telegram" and not settings.telegram_token:
            raise SettingsError("--platform telegram needs TELEGRAM_TOKEN")
        if platform == "discord" and not settings.discord_token:
            raise SettingsError("--platform discord needs DISCORD_TOKEN")
        if not settings.telegram_token and not settings.discord_token:
            raise SettingsError(
                "no platform to serve: set TELEGRAM_TOKEN and/or DISCORD_TOKEN (environment or .env)"
            )
        url = settings.telegram_webhook_url
        if url is not None:
            parsed = urlsplit(url)
            # Telegram itself only calls https; a self-hosted Bot API server (--local) may call http.
            schemes = ("https", "http") if settings.telegram_base_url else ("https",)
            if parsed.scheme not in schemes or not parsed.netloc:
                raise SettingsError(
                    f"TELEGRAM_WEBHOOK_URL must be a public {' or '.join(schemes)} URL, like "
                    "https://my-clone.fly.dev/telegram"
                )
        secret = settings.telegram_webhook_secret
        if secret is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", secret):
            raise SettingsError("TELEGRAM_WEBHOOK_SECRET may hold only A-Z, a-z, 0-9, _ and - (1-256)")
        return settings

    def webhook_secret(self) -> str:
        """The configured secret, else one derived from the token: the same in every process
        serving this bot (so a deploy's overlap is harmless), and it reveals nothing of the token."""
        if self.telegram_webhook_secret:
            return self.telegram_webhook_secret
        assert self.telegram_token
        return hashlib.sha256(b"clone-webhook:" + self.telegram_token.encode()).hexdigest()[:48]


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


async def serve(
    engine, settings: Settings, platform: str | None = None, gate: Gate | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until SIGTERM or SIGINT (or `stop` is set), then finish in-flight replies and shut down."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    telegram_app = None
    discord_client = discord_task = None
    try:
        if settings.telegram_token and platform in (None, "telegram"):
            telegram_app = await start_telegram(engine, settings, gate)
        if settings.discord_token and platform in (None, "discord"):
            discord_client = start_discord(engine, settings, gate)
            discord_task = asyncio.create_task(discord_client.start(settings.discord_token))
            discord_task.add_done_callback(lambda t: stop.set())  # a failed login stops the process
            log.info("Discord: connecting")
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("Stopping: finishing replies in flight")
        if discord_client is not None:
            await discord_client.close()
        if telegram_app is not None:
            if telegram_app.updater.running:
                await telegram_app.updater.stop()
            if telegram_app.running:
                await telegram_app.stop()  # waits for the handlers still running
            await telegram_app.shutdown()
    if discord_task is not None and discord_task.done() and not discord_task.cancelled():
        from bot.discord_bot import SelfBotRefused  # imported only when Discord runs

        error = discord_task.exception()
        if isinstance(error, SelfBotRefused):
            raise SettingsError(str(error))
        if error is not None:
            raise SettingsError(f"Discord: {type(error).__name__}: check DISCORD_TOKEN") from None


async def start_telegram(engine, settings: Settings, gate: Gate | None):
    """The running Telegram Application: long polling, or a webhook when TELEGRAM_WEBHOOK_URL is set."""
    from telegram.error import InvalidToken

    from bot.telegram import build_application, register_commands

    assert settings.telegram_token
    app = build_application(settings.telegram_token, engine, settings.telegram_base_url, gate)
    try:
        await app.initialize()  # getMe: checks the token
    except InvalidToken:
        raise SettingsError("Telegram refused TELEGRAM_TOKEN: check it with @BotFather") from None
    if not app.bot.bot.is_bot:
        await app.shutdown()
        raise SettingsError("TELEGRAM_TOKEN belongs to a user account, not a bot: use a bot token")
    await register_commands(app.bot)
    await app.start()
    url = settings.telegram_webhook_url
    if url:
        await app.updater.start_webhook(
            listen="0.0.0.0", port=settings.port, url_path=urlsplit(url).path.lstrip("/"),
            webhook_url=url, secret_token=settings.webhook_secret(), drop_pending_updates=False,
        )
        log.info("Telegram: webhook on port %d", settings.port)  # not the URL: it may hold a secret
    else:
        await app.updater.start_polling(drop_pending_updates=False)  # also removes a webhook
        log.info("Telegram: polling")
    return app


def start_discord(engine, settings: Settings, gate: Gate | None = None):
    """The Discord client, pointed at DISCORD_API_BASE / DISCORD_GATEWAY_URL when those are set."""
    import discord
    import yarl

    from bot.discord_bot import build_client

    if settings.discord_api_base:
        discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
    if settings.discord_gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)
    return build_client(engine, gate)
