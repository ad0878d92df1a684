"""`clone serve`: one process serving the clone on every platform whose token is set.

One engine, one model and one memory are shared by the platforms. `check_credentials` asks each
platform who the tokens belong to before the model loads. SIGTERM (what a platform like Heroku,
Railway or Fly sends on deploy, before a SIGKILL 5 to 30 s later) and Ctrl-C stop taking
messages at once and give the replies in progress `stop_grace_s` to go out; the messages not
answered by then are handed over: their claims released and, on Telegram, their updates left
unconfirmed, so the next process answers them. discord.py installs no SIGTERM handler of its own.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import hashlib
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from bot.gate import Gate, Rules

log = logging.getLogger(__name__)
T = TypeVar("T")
SIGNALS = (signal.SIGTERM, signal.SIGINT)
TELEGRAM_REFUSED = "Telegram refused TELEGRAM_TOKEN: check it with @BotFather"
TELEGRAM_USER = "TELEGRAM_TOKEN belongs to a user account, not a bot: use a bot token"
DISCORD_REFUSED = "Discord refused DISCORD_TOKEN: copy it again from the developer portal (Bot > Reset Token)"


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
    stop_grace_s: float = 8.0     # SIGTERM: how long the replies in progress may take
    connect_attempts: int = 4     # reaching a platform's API at start, waits doubling from:
    connect_wait_s: float = 1.0

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

    def telegram_api(self) -> str:
        return _api("the Telegram Bot API", self.telegram_base_url, "api.telegram.org", "TELEGRAM_BASE_URL")

    def discord_api(self) -> str:
        return _api("the Discord API", self.discord_api_base, "discord.com", "DISCORD_API_BASE")


def _api(name: str, url: str | None, default: str, setting: str) -> str:
    """The API for an error message: scheme, host and port only (a URL may carry credentials)."""
    if not url:
        return f"{name} at {default} ({setting} names another)"
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{name} at {parts.scheme}://{parts.hostname}{port} ({setting})"


async def connect(settings: PlatformSettings, attempt: Callable[[], Awaitable[T]], api: str,
                  errors: tuple[type[BaseException], ...]) -> T:
    """`attempt()`, tried again after a network error (`errors`) with doubling waits; the last
    failure is one line naming the API (a platform's blip at start is not worth a traceback)."""
    wait, attempts = settings.connect_wait_s, max(1, settings.connect_attempts)
    for tried in range(1, attempts + 1):
        try:
            return await attempt()
        except errors as e:
            if tried == attempts:
                raise SettingsError(f"cannot reach {api} after {tried} attempts "
                                    f"({type(e).__name__}): check the network and the address") from None
            log.warning("cannot reach %s (%s); trying again in %.1fs", api, type(e).__name__, wait)
        await asyncio.sleep(wait)
        wait *= 2
    raise AssertionError("unreachable: the last attempt returns or raises")


async def check_credentials(settings: PlatformSettings, platform: str | None = None) -> None:
    """Ask each platform to be served who its token belongs to, before anything slow (the model)
    loads: SettingsError for a token refused, a user account's token, or an API not reachable."""
    if settings.telegram_token and platform in (None, "telegram"):
        await _check_telegram(settings)
    if settings.discord_token and platform in (None, "discord"):
        await _check_discord(settings)


async def _check_telegram(settings: PlatformSettings) -> None:
    from telegram import Bot
    from telegram.error import NetworkError, TelegramError

    from bot.telegram import hide_tokens_from_logs

    assert settings.telegram_token
    hide_tokens_from_logs()
    base = {"base_url": settings.telegram_base_url} if settings.telegram_base_url else {}
    bot = Bot(settings.telegram_token, **base)
    try:
        await connect(settings, bot.initialize, settings.telegram_api(), (NetworkError,))  # getMe
        if not bot.bot.is_bot:
            raise SettingsError(TELEGRAM_USER)
    except TelegramError as e:
        raise SettingsError(_telegram_refused(settings, e)) from None
    finally:
        await bot.shutdown()


def _telegram_refused(settings: PlatformSettings, error: Exception) -> str:
    """One line for an error of the Bot API at start; never the token (InvalidToken quotes it)."""
    from telegram.error import InvalidToken, NetworkError, TelegramError

    if isinstance(error, InvalidToken):
        return TELEGRAM_REFUSED
    if isinstance(error, NetworkError):
        return f"cannot reach {settings.telegram_api()} ({type(error).__name__}): check the network"
    if type(error) is TelegramError:  # PTB's own: the answer was no Bot API's (it quotes the body)
        return f"{settings.telegram_api()} does not answer like the Telegram Bot API"
    text = str(error).replace(settings.telegram_token or "\0", "<TELEGRAM_TOKEN>")  # Telegram's words
    return f"{settings.telegram_api()} refused to start the bot: {type(error).__name__}: {text}"


async def _check_discord(settings: PlatformSettings) -> None:
    """GET users/@me through discord.py's own HTTP client, as its login does."""
    import aiohttp
    import discord

    from bot.discord_bot import SELF_BOT

    token = settings.discord_token
    assert token
    _point_discord(settings)

    async def login() -> dict[str, Any]:
        http = discord.http.HTTPClient(asyncio.get_running_loop())
        try:
            return await http.static_login(token)
        finally:
            await http.close()

    try:
        me = await connect(settings, login, settings.discord_api(), (aiohttp.ClientError, OSError))
    except discord.LoginFailure:
        raise SettingsError(DISCORD_REFUSED) from None
    except discord.HTTPException as e:
        raise SettingsError(f"{settings.discord_api()} answered {e.status} to the token check") from None
    if not isinstance(me, dict):  # a web page where the API should be
        raise SettingsError(f"{settings.discord_api()} does not answer like the Discord API")
    if not me.get("bot"):
        raise SettingsError(SELF_BOT)


async def serve(
    engine, settings: PlatformSettings, platform: str | None = None, gate: Gate | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until SIGTERM or SIGINT (or `stop` is set), then stop as the module says."""
    stop = stop or asyncio.Event()
    gate = gate or Gate(Rules(), engine.persona.id)  # one gate for both platforms, to drain at stop
    # The interpreter's last garbage collections, over torch's and transformers' objects, take
    # seconds on a small CPU: seconds that count against the platform's SIGKILL, for nothing.
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    loop = asyncio.get_running_loop()
    for sig in SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    running = Running(engine, gate)
    try:
        if settings.telegram_token and platform in (None, "telegram"):
            running.telegram = await start_telegram(engine, settings, gate)
        if settings.discord_token and platform in (None, "discord"):
            running.discord = start_discord(engine, settings, gate)
            running.discord_task = asyncio.create_task(running.discord.start(settings.discord_token))
            running.discord_task.add_done_callback(lambda t: stop.set())  # a failed login stops the process
            log.info("Discord: connecting")
        await stop.wait()
    finally:
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)
        await running.stop(settings.stop_grace_s)
    running.raise_discord_error()


class Running:
    """The platforms one `serve` started, and how they stop."""

    def __init__(self, engine, gate: Gate) -> None:
        self.engine, self.gate = engine, gate
        self.telegram: Any = None       # telegram.ext.Application
        self.discord: Any = None        # bot.discord_bot.CloneClient
        self.discord_task: asyncio.Task | None = None

    async def stop(self, grace_s: float) -> None:
        """Take nothing more, give the replies in progress `grace_s`, cancel the rest (handed over)."""
        log.info("Stopping: finishing the replies in progress (up to %.1fs); the rest is left to the "
                 "next process", grace_s)
        self.gate.drain()
        app, client = self.telegram, self.discord
        if app is not None and app.updater.running:
            await app.updater.stop()  # no getUpdates more; it confirmed only what was handled
        waits = [asyncio.ensure_future(app.stop())] if app is not None and app.running else []
        if client is not None:
            waits.append(asyncio.ensure_future(client.finish()))
        if waits and (await asyncio.wait(waits, timeout=grace_s))[1]:
            in_progress = list(app.update_processor.tasks if app is not None else ())
            in_progress += list(client.in_flight if client is not None else ())
            log.warning("Stopping: grace over; cancelling the %d replies in progress (those not begun "
                        "are handed over)", len(in_progress))
            for task in in_progress:
                task.cancel()
            await interrupt_generation(self.engine)
            await asyncio.wait(waits)
        if app is not None:
            await app.bot.confirm_handled()
            await app.shutdown()
        if client is not None:
            await client.close()

    def raise_discord_error(self) -> None:
        task = self.discord_task
        if task is None or not task.done() or task.cancelled():
            return
        from bot.discord_bot import SelfBotRefused  # imported only when Discord runs

        error = task.exception()
        if isinstance(error, SelfBotRefused):
            raise SettingsError(str(error))
        if error is not None:
            raise SettingsError(f"Discord: {type(error).__name__}: check DISCORD_TOKEN") from None


class GenerationStopped(RuntimeError):
    """Raised inside the model by `interrupt_generation`."""


def _stop_generation(module: Any, args: Any) -> None:
    raise GenerationStopped


async def interrupt_generation(engine) -> None:
    """Stop an in-process generation between two tokens. Its replies were cancelled, but its thread
    would run on (20 s and more on a small CPU) and hold the process open past the grace."""
    backend = getattr(engine, "backend", None)
    embeddings = getattr(getattr(backend, "model", None), "get_input_embeddings", None)
    if backend is None or embeddings is None:
        return  # a remote backend: cancelling its request was enough
    await backend.close()  # first: its worker would log the batch's failure as a crash
    embeddings().register_forward_pre_hook(_stop_generation)  # runs before every step


async def start_telegram(engine, settings: PlatformSettings, gate: Gate | None):
    """The running Telegram Application: long polling, or a webhook when TELEGRAM_WEBHOOK_URL is set."""
    from telegram.error import NetworkError, TelegramError

    from bot.telegram import build_application, register_commands

    assert settings.telegram_token
    app = build_application(settings.telegram_token, engine, settings.telegram_base_url, gate)
    try:
        await connect(settings, app.initialize, settings.telegram_api(), (NetworkError,))  # getMe
        if not app.bot.bot.is_bot:
            raise SettingsError(TELEGRAM_USER)
        await register_commands(app.bot, gate.rules.owner if gate else ())
        await app.start()
        await _receive(app, settings)
    except BaseException as e:
        if app.running:
            await app.stop()
        await app.shutdown()
        if isinstance(e, TelegramError):
            raise SettingsError(_telegram_refused(settings, e)) from None
        raise
    return app


async def _receive(app, settings: PlatformSettings) -> None:
    url, retries = settings.telegram_webhook_url, settings.connect_attempts - 1
    if url:
        await app.updater.start_webhook(
            listen="0.0.0.0", port=settings.port, url_path=urlsplit(url).path.lstrip("/"),
            webhook_url=url, secret_token=settings.webhook_secret(), drop_pending_updates=False,
            bootstrap_retries=retries)
        log.info("Telegram: webhook on port %d", settings.port)  # not the URL: it may hold a secret
    else:  # also removes a webhook
        await app.updater.start_polling(drop_pending_updates=False, bootstrap_retries=retries,
                                        error_callback=_polling_failed)
        log.info("Telegram: polling")


def _polling_failed(error: Exception) -> None:
    """PTB logs a traceback for each; a Conflict (two processes polling during a deploy) or a
    dropped connection is worth one line, and PTB tries again by itself."""
    log.warning("Telegram: getUpdates failed (%s); trying again", type(error).__name__)


def _point_discord(settings: PlatformSettings) -> None:
    """discord.py's addresses: DISCORD_API_BASE / DISCORD_GATEWAY_URL when set."""
    import discord
    import yarl

    if settings.discord_api_base:
        discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
    if settings.discord_gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


def start_discord(engine, settings: PlatformSettings, gate: Gate | None = None):
    """The Discord client, pointed at DISCORD_API_BASE / DISCORD_GATEWAY_URL when those are set."""
    from bot.discord_bot import build_client

    _point_discord(settings)
    return build_client(engine, gate)
