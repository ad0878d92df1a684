"""The Discord adapter: a discord.py Client subclass in front of the shared conversation flow.

`CloneClient.on_message` decides whether a message is for the clone and hands it to the flow with
a `DiscordChat` that sends back to its channel; the slash commands get the flow's command replies.
DMs get an answer to every message; server channels only when the bot is @mentioned, a message
replies to one of its own, or the channel is listed in `reply_in`. Everything is sent with every
mention disabled, so model output can never ping @everyone, a role or a user. Logs carry ids,
lengths and timings only, never message text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
from collections.abc import AsyncIterator
from typing import Any

import discord
from discord import app_commands

from bot.chunks import DISCORD_LIMIT, split_message
from bot.conversation import Conversation, Inbound, Platform, RepliedTo, command_in
from bot.engine import Engine
from bot.gate import Gate, Sender, Stopping

log = logging.getLogger(__name__)
PLATFORM = "discord"
DISCORD = Platform(PLATFORM, "channel", "a DM, or mention me / reply to me in a server channel")
NO_PINGS = discord.AllowedMentions.none()
SELF_BOT = ("DISCORD_TOKEN belongs to a user account, not a bot; self-bots are not allowed. "
            "Create a bot in the Discord developer portal and use its token.")
RESTARTING = "I'm restarting; try again in a moment."


class SelfBotRefused(RuntimeError):
    """The token belongs to a user account: automating one (a self-bot) breaks Discord's terms."""


def build_client(engine: Engine, gate: Gate | None = None, **options: Any) -> CloneClient:
    """A ready Client: `await client.start(token)` (or `client.run(token)`).

    `gate` decides who is answered (access lists, rate limit, once per message); without one,
    everyone is, at the default rate limit, with this process as the only one serving.
    `options` go to discord.Client (e.g. guild_ready_timeout in tests).
    """
    # discord.py's DEBUG logs dump whole gateway payloads (message text included).
    logging.getLogger("discord").setLevel(logging.INFO)
    return CloneClient(Conversation(engine, DISCORD, gate), **options)


class CloneClient(discord.Client):
    """The clone on Discord: gateway events and slash commands, answered through the flow."""

    def __init__(self, conversation: Conversation, **options: Any) -> None:
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: enable it in the developer portal too
        super().__init__(intents=intents, allowed_mentions=NO_PINGS, **options)
        self.conversation = conversation
        self.in_flight: set[asyncio.Task] = set()  # messages being answered, for a graceful stop
        self.tree = app_commands.CommandTree(self)
        for name, description in DISCORD.menu().items():
            self.tree.add_command(_slash_command(self, name, description))

    async def setup_hook(self) -> None:
        """After login, before the gateway: a user token is refused here, never brought online."""
        if self.user is not None and not self.user.bot:
            raise SelfBotRefused(SELF_BOT)
        try:  # register the slash commands; the text forms work without them
            await self.tree.sync()
        except discord.HTTPException as e:  # e.g. invited without the applications.commands scope
            log.warning("discord: slash commands not registered (status=%s)", e.status)

    async def on_ready(self) -> None:
        log.info("discord ready user_id=%s", self.user.id if self.user else None)

    async def on_message(self, message: discord.Message) -> None:
        me = self.user
        if me is None or message.author.id == me.id or message.author.bot:
            return
        is_dm = isinstance(message.channel, discord.DMChannel)
        text = message.content or ""
        if not is_dm:
            addressed = _mentions(message, me) or _replies_to(message, me)
            if not (addressed or self.conversation.listens_in(str(message.channel.id))):
                return
            text = _strip_mention(text, me.id)
        if not text:
            return
        sender = _sender(message)  # the owner's /correct is a command; anyone else's, a message
        command = command_in(text, self.conversation.is_owner(sender))
        inbound = Inbound(sender, message.author.display_name, text, is_dm, command,
                          _replied_to(message, me))
        chat, task = DiscordChat(message), asyncio.current_task()
        assert task is not None
        self.in_flight.add(task)
        try:  # No await before this: the flow takes the channel's turn first thing.
            # Handed over: released for a process that sees it too (Discord never delivers it again).
            await self.conversation.gate.answer_or_hand_over(
                inbound.sender, self.conversation.handle(inbound, chat), lambda: chat.sending,
                lambda: None)
        finally:
            self.in_flight.discard(task)

    async def finish(self) -> None:
        """Until the messages being answered are done (or cancelled)."""
        await asyncio.gather(*self.in_flight, return_exceptions=True)

    async def on_slash(self, interaction: discord.Interaction, command: str) -> None:
        """A slash command, answered at once (Discord wants an answer within 3 s)."""
        guild_id = str(interaction.guild_id) if interaction.guild_id else None
        sender = Sender(PLATFORM, str(interaction.user.id), str(interaction.channel_id),
                        str(interaction.id), guild_id)
        try:
            reply = await self.conversation.answer_command(command, sender)
        except Stopping:  # Discord wants an answer now; this process will give none
            await interaction.response.send_message(RESTARTING, ephemeral=True)
            return
        try:
            if reply is not None:  # None: another process took it
                await interaction.response.send_message(reply.text, ephemeral=reply.private,
                                                        allowed_mentions=NO_PINGS)
        finally:
            await self.conversation.gate.settle(sender)

    async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
        # Never fatal; the exception's class only: its text could quote a message.
        log.warning("discord error event=%s error=%s", event_method, type(sys.exc_info()[1]).__name__)


def _slash_command(client: CloneClient, name: str, description: str) -> app_commands.Command:
    async def callback(interaction: discord.Interaction) -> None:  # no options: the signature is read
        await client.on_slash(interaction, f"/{name}")

    return app_commands.Command(name=name, description=description, callback=callback)


class DiscordChat:
    """The channel a message came from, for the shared flow: sends, quotes, shows "typing"."""

    def __init__(self, message: discord.Message) -> None:
        self.message = message
        self.sending = False  # once true, part of the reply may have reached the channel

    async def send(self, texts: list[str], quote: bool = False) -> int:
        self.sending = True
        return await _send_all(self.message.channel, texts, self.message if quote else None)

    @contextlib.asynccontextmanager
    async def typing(self) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            try:  # discord.py refreshes it every 5 s until the block ends
                await stack.enter_async_context(self.message.channel.typing())
            except discord.HTTPException as e:  # cosmetic: never worth losing the reply over
                log.debug("typing failed channel=%s status=%s", self.message.channel.id, e.status)
            yield


def _sender(message: discord.Message) -> Sender:
    # A server missing from discord.py's cache still names itself on the channel: the block list
    # must not fail open for it.
    guild_id = message.guild.id if message.guild else getattr(message.channel, "guild_id", None)
    return Sender(PLATFORM, str(message.author.id), str(message.channel.id), str(message.id),
                  str(guild_id) if guild_id else None)


def _mentions(message: discord.Message, me: discord.ClientUser) -> bool:
    return any(user.id == me.id for user in message.mentions)


def _replies_to(message: discord.Message, me: discord.ClientUser) -> bool:
    return _replied_to(message, me) is not None


def _replied_to(message: discord.Message, me: discord.ClientUser) -> RepliedTo | None:
    """The clone's own message this one replies to, as Discord delivered it with the reply."""
    ref = message.reference
    resolved = ref.resolved if ref else None
    if not isinstance(resolved, discord.Message) or resolved.author.id != me.id:
        return None
    return RepliedTo(str(resolved.id), resolved.content)


def _strip_mention(text: str, user_id: int) -> str:
    return " ".join(re.sub(rf"<@!?{user_id}>", " ", text).split())


async def _send_all(
    channel: discord.abc.Messageable, replies: list[str], quote: discord.Message | None = None
) -> int:
    """Send each reply (split at Discord's limit) in order, the first quoting `quote` when given;
    the number of pieces sent.

    discord.py waits out rate limits itself; any other HTTP error ends this reply (ids only).
    """
    sent = 0
    channel_id = getattr(channel, "id", None)
    for piece in (p for reply in replies for p in split_message(reply, DISCORD_LIMIT)):
        try:
            # fail_if_not_exists=False: still sent when the quoted message was deleted meanwhile.
            reference = quote.to_reference(fail_if_not_exists=False) if quote and sent == 0 else None
            await channel.send(piece, allowed_mentions=NO_PINGS, reference=reference)
            sent += 1
        except discord.Forbidden:  # no permission in this channel, or the user blocks DMs
            log.warning("forbidden channel=%s", channel_id)
            return sent
        except discord.HTTPException as e:
            log.warning("send failed channel=%s status=%s", channel_id, e.status)
            return sent
    return sent
