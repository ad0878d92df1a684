"""`clone serve`: one process serving the clone on every platform whose token is set.

One engine, one model and one memory are shared by the platforms. SIGTERM (what a platform
like Heroku, Railway or Fly sends on deploy) and Ctrl-C stop taking new messages, let the
replies in flight finish, and close cleanly; discord.py installs no SIGTERM handler of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
from dataclasses import dataclass
from urllib.parse import urlsplit

from bot.gate import Gate

log = logging.getLogger(__name__)


class SettingsError(ValueError):
    """A setting that is missing or wrong; the message names it."""


@dataclass(frozen=True)
class PlatformSettings:
    """What the platforms need, as plain values (the command line reads and validates them)."""

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

    def check(self, platform: str | None = None) -> None:
        """Refuse a run with nothing (or not the asked platform) to serve."""
        if platform == "telegram" and not self.telegram_token:
            raise SettingsError("--platform telegram needs TELEGRAM_TOKEN")
        if platform == "discord" and not self.discord_token:
            raise SettingsError("--platform discord needs DISCORD_TOKEN")
        if not self.telegram_token and not self.discord_token:
            raise SettingsError(
                "no platform to serve: set TELEGRAM_TOKEN and/or DISCORD_TOKEN (environment or .env)"
            )

    def webhook_secret(self) -> str:
        """The configured secret, else one derived from the token: the same in every process
        serving this bot (so a deploy's overlap is harmless), and it reveals nothing of the token."""
        if self.telegram_webhook_secret:
            return self.telegram_webhook_secret
        assert self.telegram_token
        return hashlib.sha256(b"clone-webhook:" + self.telegram_token.encode()).hexdigest()[:48]


async def serve(
    engine, settings: PlatformSettings, platform: str | None = None, gate: Gate | None = None,
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


async def start_telegram(engine, settings: PlatformSettings, gate: Gate | None):
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


def start_discord(engine, settings: PlatformSettings, gate: Gate | None = None):
    """The Discord client, pointed at DISCORD_API_BASE / DISCORD_GATEWAY_URL when those are set."""
    import discord
    import yarl

    from bot.discord_bot import build_client

    if settings.discord_api_base:
        discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
    if settings.discord_gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)
    return build_client(engine, gate)
