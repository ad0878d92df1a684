"""The Telegram adapter: python-telegram-bot's Application in front of the shared conversation flow.

Small handlers, registered in one place (`TelegramAdapter.register`), turn a PTB update into the
flow's `Inbound` and a `TelegramChat` that sends back to its chat. Private chats get an answer to
every text message; groups only when the bot is @mentioned, a message replies to one of its own,
or the group is listed in `reply_in`. Edits are not new messages and are ignored. Logs carry ids,
lengths and timings only, never message text.

Telegram confirms every update below the `offset` a getUpdates call carries, and PTB's Updater
moves the offset past what it fetched at once, before anything is answered. Here the offset
stays at the oldest update not yet handled (`UpdateLedger`, kept by `LedgerBot` and
`TrackedUpdates`), so that a process stopped mid-work leaves what it did not answer to the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dtm
import logging
import re
import warnings
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any

from telegram import Bot, BotCommandScopeChat, Message, ReplyParameters, Update
from telegram.constants import ChatAction, ChatType, MessageEntityType
from telegram.error import Forbidden, NetworkError, RetryAfter, TelegramError, TimedOut
from telegram.ext import (
    Application,
    ApplicationBuilder,
    BaseUpdateProcessor,
    CommandHandler,
    ContextTypes,
    ExtBot,
    MessageHandler,
    filters,
)
from telegram.request import HTTPXRequest

from bot.chunks import TELEGRAM_LIMIT, split_message
from bot.conversation import COMMANDS, OWNER_COMMANDS, Conversation, Inbound, Platform, RepliedTo
from bot.engine import Engine
from bot.gate import Gate, Sender

log = logging.getLogger(__name__)
PLATFORM = "telegram"
TYPING_EVERY_S = 4.0  # Telegram shows "typing" for about 5 s per sendChatAction
MAX_RETRY_WAIT_S = 30.0
RETRY_AFTER_DROP_S = 0.5
REPOLL_S = 0.5  # while updates are in hand, getUpdates returns them at once: ask again this often
_MENTION = re.compile(r"@(?=\w)")


def _defuse_mentions(text: str) -> str:
    """Telegram turns any "@username" in plain text into a mention that notifies that user; a word
    joiner after the "@" keeps the text as it reads while the model's output pings no one."""
    return _MENTION.sub("@\u2060", text)


TELEGRAM = Platform(PLATFORM, "chat", "a private chat, or mention me / reply to me in a group",
                    _defuse_mentions)


def hide_tokens_from_logs() -> None:
    # httpx logs every request URL at INFO, and the URL carries the bot token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # PTB's own DEBUG logs print the token and whole updates (message text included).
    logging.getLogger("telegram").setLevel(logging.INFO)
    # It logs an answer that is not JSON whole, with a traceback; the caller gets the error anyway.
    logging.getLogger("telegram.request.BaseRequest").setLevel(logging.CRITICAL)
    # At shutdown the Updater confirms what it fetched with one last getUpdates, and logs a failed
    # one (a timeout on a busy machine) with a traceback; the next process confirms it anyway.
    updater = logging.getLogger("telegram.ext.Updater")
    if not any(isinstance(f, _OneLineNetworkErrors) for f in updater.filters):
        updater.addFilter(_OneLineNetworkErrors())


class _OneLineNetworkErrors(logging.Filter):
    """A Telegram network error logged with its traceback becomes one line naming its class."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, NetworkError):
            record.msg, record.args = "%s (%s)", (record.getMessage(), type(error).__name__)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def build_application(
    token: str, engine: Engine, base_url: str | None = None, gate: Gate | None = None,
    concurrent_updates: bool | int = True,
) -> Application:
    """A ready Application: run it with `run_polling()` or initialize/start/updater yourself.

    `gate` decides who is answered (access lists, rate limit, once per message); without one,
    everyone is, at the default rate limit, with this process as the only one serving.
    `concurrent_updates`: PTB's own default (False) would let one slow reply hold up every chat.
    """
    hide_tokens_from_logs()
    ledger = UpdateLedger()
    bot = LedgerBot(ledger, token, **({"base_url": base_url} if base_url else {}))  # + token + method
    at_once = 256 if concurrent_updates is True else max(1, int(concurrent_updates))  # PTB's numbers
    app = ApplicationBuilder().bot(bot).concurrent_updates(TrackedUpdates(ledger, at_once)).build()
    TelegramAdapter(Conversation(engine, TELEGRAM, gate), ledger).register(app)
    return app


class UpdateLedger:
    """The updates this process fetched and has not handled yet; `offset()` is what getUpdates may
    confirm. An update handed over to the next process (`keep`) is never confirmed here."""

    def __init__(self) -> None:
        self.pending: set[int] = set()
        self.kept: set[int] = set()
        self.next_id = 0  # one past the newest update fetched
        self.polled = False  # never in webhook mode, where getUpdates is refused
        self._progress = asyncio.Event()

    def offset(self) -> int:
        return min(self.pending, default=self.next_id)

    def fetched(self, update_ids: Iterable[int]) -> None:
        for update_id in update_ids:
            self.pending.add(update_id)
            self.next_id = max(self.next_id, update_id + 1)

    def done(self, update_id: int) -> None:
        if update_id not in self.kept:
            self.pending.discard(update_id)
            self._progress.set()

    def keep(self, update_id: int) -> None:
        self.kept.add(update_id)

    async def progress(self, timeout_s: float) -> None:
        """Until an update is done, or `timeout_s`."""
        self._progress.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._progress.wait(), timeout_s)


class LedgerBot(ExtBot):
    """PTB's bot, but getUpdates confirms only the updates handled (`UpdateLedger.offset`) and hands
    PTB only the new ones: those in hand come back with every call until they are done."""

    def __init__(self, ledger: UpdateLedger, token: str, **kwargs: Any) -> None:
        super().__init__(token, request=HTTPXRequest(connection_pool_size=256),  # PTB's defaults
                         get_updates_request=HTTPXRequest(connection_pool_size=1), **kwargs)
        self._ledger = ledger  # "_": PTB freezes a bot's public attributes

    async def get_updates(self, offset: int | None = None, *args: Any, **kwargs: Any) -> tuple[Update, ...]:
        ledger = self._ledger
        ledger.polled = True
        updates = await super().get_updates(ledger.offset() or offset, *args, **kwargs)
        new = tuple(u for u in updates if u.update_id >= ledger.next_id)
        if updates and not new and kwargs.get("timeout"):  # a long poll that could not wait
            await ledger.progress(REPOLL_S)
        ledger.fetched(u.update_id for u in new)
        return new

    async def confirm_handled(self) -> None:
        """Tell Telegram of every update handled so far (and of no other)."""
        if not self._ledger.polled:
            return
        try:
            await self.get_updates(timeout=0, limit=1)
        except TelegramError as e:  # e.g. Conflict with the process taking over: it confirms later
            log.warning("telegram: handled updates not confirmed (%s)", type(e).__name__)


class TrackedUpdates(BaseUpdateProcessor):
    """Runs each update's handlers, recording it done in the ledger; `tasks` are those running."""

    def __init__(self, ledger: UpdateLedger, max_concurrent_updates: int) -> None:
        super().__init__(max_concurrent_updates)
        self.ledger = ledger
        self.tasks: set[asyncio.Task] = set()

    async def do_process_update(self, update: object, coroutine: Awaitable[Any]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await coroutine
        finally:
            self.tasks.discard(task)
            if isinstance(update, Update):
                self.ledger.done(update.update_id)

    async def initialize(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None


async def register_commands(bot: Bot, owners: Iterable[str] = ()) -> None:
    """The command menu Telegram shows under "/", with the owner's commands in the owners' private
    chats only (`owners`: "telegram:<id>" as in [serve] owner); cosmetic, so a failure is only logged."""
    try:
        await bot.set_my_commands(list(TELEGRAM.menu().items()))
        for owner in owners:
            platform, user_id = owner.split(":", 1)
            if platform == PLATFORM:
                await bot.set_my_commands(list(TELEGRAM.menu(owner=True).items()),
                                          scope=BotCommandScopeChat(int(user_id)))
    except TelegramError as e:
        log.warning("telegram: command menu not set (%s)", type(e).__name__)


class TelegramAdapter:
    """The update handlers: each decides whether a message is for the clone, then hands it over."""

    def __init__(self, conversation: Conversation, ledger: UpdateLedger | None = None) -> None:
        self.conversation, self.ledger = conversation, ledger or UpdateLedger()

    def register(self, app: Application) -> None:
        new_messages = filters.UpdateType.MESSAGE  # an edit is not a new message to answer
        names = [c.removeprefix("/") for c in (*COMMANDS, *OWNER_COMMANDS)]
        app.add_handler(CommandHandler(names, self.on_command, filters=new_messages))
        app.add_handler(MessageHandler(new_messages & filters.TEXT & ~filters.COMMAND, self.on_text))
        app.add_error_handler(self.on_error)

    async def on_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is None or message.text is None or _from_bot(message):
            return
        is_dm = message.chat.type == ChatType.PRIVATE
        text = message.text
        if not is_dm:
            addressed = _mentions(message, context.bot) or _replies_to_bot(message, context.bot)
            if not (addressed or self.conversation.listens_in(str(message.chat_id))):
                return
            text = _strip_mention(text, context.bot.username)
            if not text:
                return
        # No await before this: the flow takes the chat's turn first thing.
        await self._handle(update, _inbound(message, text, is_dm), TelegramChat(context.bot, message))

    async def on_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is None or message.text is None or message.from_user is None or _from_bot(message):
            return
        # "/about@sam_clone_bot" in a group: CommandHandler already checked the name is ours.
        command = message.text.split(maxsplit=1)[0].split("@", 1)[0].lower()
        inbound = _inbound(message, message.text, message.chat.type == ChatType.PRIVATE, command,
                           _replied_to(message, context.bot))
        if command in OWNER_COMMANDS and not self.conversation.is_owner(inbound.sender):
            return  # not theirs: as any command the bot does not have, it goes unanswered
        await self._handle(update, inbound, TelegramChat(context.bot, message))

    async def _handle(self, update: Update, inbound: Inbound, chat: TelegramChat) -> None:
        """The flow, unless this process is stopping: then the update stays unconfirmed."""
        await self.conversation.gate.answer_or_hand_over(
            inbound.sender, self.conversation.handle(inbound, chat), lambda: chat.sending,
            lambda: self.ledger.keep(update.update_id))

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        update_id = update.update_id if isinstance(update, Update) else None
        # The error's class only: the exception text could quote a message.
        log.warning("telegram error update=%s error=%s", update_id, type(context.error).__name__)


class TelegramChat:
    """The chat a message came from, for the shared flow: sends, quotes, shows "typing"."""

    def __init__(self, bot: Bot, message: Message) -> None:
        self.bot, self.chat_id, self.message_id = bot, message.chat_id, message.message_id
        self.sending = False  # once true, part of the reply may have reached the chat

    async def send(self, texts: list[str], quote: bool = False) -> int:
        self.sending = True
        return await _send_all(self.bot, self.chat_id, texts, self.message_id if quote else None)

    @contextlib.asynccontextmanager
    async def typing(self) -> AsyncIterator[None]:
        """Shows "typing", refreshed until the reply is ready: one action lasts about 5 s."""
        task = asyncio.create_task(self._keep_typing())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _keep_typing(self) -> None:
        while True:
            try:
                await self.bot.send_chat_action(self.chat_id, ChatAction.TYPING)
            except TelegramError as e:  # cosmetic: never worth failing the reply over
                log.debug("typing failed chat=%s error=%s", self.chat_id, type(e).__name__)
            await asyncio.sleep(TYPING_EVERY_S)


def _inbound(message: Message, text: str, is_dm: bool, command: str | None = None,
             replied_to: RepliedTo | None = None) -> Inbound:
    user = message.from_user
    sender = Sender(PLATFORM, str(user.id) if user else "unknown", str(message.chat_id),
                    str(message.message_id))
    return Inbound(sender, user.full_name if user else "", text, is_dm, command, replied_to)


def _from_bot(message: Message) -> bool:
    return bool(message.from_user and message.from_user.is_bot)


def _mentions(message: Message, bot: Bot) -> bool:
    me = f"@{bot.username}".lower()
    for entity, text in message.parse_entities(
        [MessageEntityType.MENTION, MessageEntityType.TEXT_MENTION]
    ).items():
        if entity.type == MessageEntityType.MENTION and text.lower() == me:
            return True
        if entity.user is not None and entity.user.id == bot.id:
            return True
    return me in (message.text or "").lower()  # an entity-less client: fall back to the text itself


def _replies_to_bot(message: Message, bot: Bot) -> bool:
    replied = message.reply_to_message
    return bool(replied and replied.from_user and replied.from_user.id == bot.id)


def _replied_to(message: Message, bot: Bot) -> RepliedTo | None:
    """The clone's own message this one replies to, if it replies to one."""
    replied = message.reply_to_message
    if replied is None or not _replies_to_bot(message, bot):
        return None
    return RepliedTo(str(replied.message_id), replied.text or "")


def _strip_mention(text: str, username: str) -> str:
    me, lowered, out = f"@{username}".lower(), text.lower(), text
    while (i := lowered.find(me)) >= 0:
        out, lowered = out[:i] + out[i + len(me):], lowered[:i] + lowered[i + len(me):]
    return " ".join(out.split())


def _retry_seconds(error: RetryAfter) -> float:
    with warnings.catch_warnings():  # PTB 22 warns while retry_after may still be an int
        warnings.simplefilter("ignore")
        value = error.retry_after
    seconds = value.total_seconds() if isinstance(value, dtm.timedelta) else float(value)
    return min(MAX_RETRY_WAIT_S, max(0.0, seconds))


async def _send_all(bot: Bot, chat_id: int, replies: list[str], quote: int | None = None) -> int:
    """Send each reply (split at Telegram's limit) in order, the first quoting message `quote` when
    given; the number of pieces sent.

    A rate limit is waited out once and a dropped connection retried once; a timeout is not
    retried (the message may have arrived), and any other error ends this reply (logged, ids only).
    """
    sent = 0
    pieces = [p for reply in replies for p in split_message(reply, TELEGRAM_LIMIT)]
    for piece in pieces:
        for attempt in (1, 2):
            try:
                reply_to = None
                if quote is not None and sent == 0:  # still sent if that message was deleted
                    reply_to = ReplyParameters(quote, allow_sending_without_reply=True)
                await bot.send_message(chat_id, piece, reply_parameters=reply_to)
                sent += 1
                break
            except RetryAfter as e:
                wait = _retry_seconds(e)
                log.warning("rate limited chat=%s wait=%.1fs attempt=%d", chat_id, wait, attempt)
                if attempt == 2:
                    return sent
                await asyncio.sleep(wait)
            except Forbidden:  # blocked by the user or removed from the group
                log.warning("forbidden chat=%s", chat_id)
                return sent
            except NetworkError as e:
                if attempt == 2 or isinstance(e, TimedOut):
                    log.warning("send failed chat=%s error=%s", chat_id, type(e).__name__)
                    return sent
                log.warning("send retried chat=%s error=%s", chat_id, type(e).__name__)
                await asyncio.sleep(RETRY_AFTER_DROP_S)
            except TelegramError as e:
                log.warning("send failed chat=%s error=%s", chat_id, type(e).__name__)
                return sent
    return sent
