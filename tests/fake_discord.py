"""A local fake of Discord (REST + gateway on one port), enough to drive discord.py's real Client.

Point the client at it with `fake.patch()` (sets Route.BASE and DEFAULT_GATEWAY). Every REST call
is recorded; MESSAGE_CREATE events can be pushed to the connected client.
"""

from __future__ import annotations

import asyncio
import datetime as dtm
import json
from dataclasses import dataclass, field
from typing import Any

import discord
import yarl
from aiohttp import WSMsgType, web

from tests.platform_helpers import free_port

BOT = {"id": "900000000000000001", "username": "sam_clone", "discriminator": "0",
       "global_name": "Sam clone", "avatar": None, "bot": True}
OWNER = {"id": "900000000000000002", "username": "owner", "discriminator": "0",
         "global_name": None, "avatar": None}
APPLICATION = {"id": "900000000000000003", "name": "Sam clone", "icon": None, "description": "",
               "bot_public": True, "bot_require_code_grant": False, "owner": OWNER,
               "verify_key": "00", "flags": 0}


@dataclass
class Call:
    method: str
    path: str  # after /api/v10, e.g. /channels/5/messages
    json: Any


@dataclass
class FakeDiscord:
    calls: list[Call] = field(default_factory=list)
    port: int = 0
    forbid_typing: bool = False
    forbid_next_sends: int = 0  # answer this many coming message POSTs with a 403
    me: dict[str, Any] = field(default_factory=lambda: dict(BOT))  # what /users/@me answers
    token: str | None = None  # when set, REST calls with another token get a 401, as from Discord
    resumed: int = 0  # RESUMEs seen: a client coming back after a dropped connection
    commands: list[dict[str, Any]] = field(default_factory=list)  # slash commands registered
    _seq: int = 0
    _next_id: int = 1_000_000_000_000_000_000
    _sockets: list[web.WebSocketResponse] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        self.identified = asyncio.Event()
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def patch(self, monkeypatch) -> None:
        """Send the real client's REST calls and gateway connection here."""
        monkeypatch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{self.port}/api/v10")
        monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY",
                            yarl.URL(f"ws://127.0.0.1:{self.port}/gateway"))

    @property
    def connected(self) -> int:
        """How many clients hold an open gateway connection (each gets every event)."""
        return sum(not ws.closed for ws in self._sockets)

    async def drop_connections(self) -> None:
        """Hang up on every client, as a network blip or a Discord restart does."""
        for ws in self._sockets:
            if not ws.closed:
                await ws.close(code=4000)  # "unknown error": the client reconnects and resumes

    async def stop(self) -> None:
        for ws in self._sockets:
            if not ws.closed:
                await ws.close()
        if self._runner:
            await self._runner.cleanup()

    def new_id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    # -- what the tests read -------------------------------------------------------------------

    def sent(self, channel_id: str | None = None) -> list[dict[str, Any]]:
        """JSON bodies of message POSTs, in order, optionally to one channel."""
        return [c.json for c in self.calls
                if c.method == "POST" and c.path.endswith("/messages")
                and (channel_id is None or c.path == f"/channels/{channel_id}/messages")]

    def typing(self, channel_id: str) -> int:
        return sum(c.method == "POST" and c.path == f"/channels/{channel_id}/typing"
                   for c in self.calls)

    # -- pushing events ------------------------------------------------------------------------

    def message(self, content: str, author: dict, channel_id: str, guild_id: str | None = None,
                mentions: list[dict] | None = None, referenced: dict | None = None) -> dict:
        """A MESSAGE_CREATE payload, as Discord sends it."""
        msg: dict[str, Any] = {
            "id": self.new_id(), "channel_id": channel_id, "author": author, "content": content,
            "timestamp": dtm.datetime.now(dtm.UTC).isoformat(), "edited_timestamp": None,
            "tts": False, "mention_everyone": False, "mentions": mentions or [],
            "mention_roles": [], "attachments": [], "embeds": [], "pinned": False,
            "type": 19 if referenced else 0,
        }
        if guild_id is not None:
            msg["guild_id"] = guild_id
            msg["member"] = {"roles": [], "joined_at": msg["timestamp"], "deaf": False,
                             "mute": False, "flags": 0}
        if referenced:
            msg["message_reference"] = {"message_id": referenced["id"], "channel_id": channel_id,
                                        **({"guild_id": guild_id} if guild_id else {})}
            msg["referenced_message"] = referenced
        return msg

    async def push(self, message: dict) -> None:
        await self._dispatch("MESSAGE_CREATE", message)

    def interaction(self, name: str, author: dict, channel_id: str, guild_id: str | None = None) -> dict:
        """An INTERACTION_CREATE payload: someone used the slash command `name`."""
        registered = {c["name"]: c["id"] for c in self.commands}
        data: dict[str, Any] = {
            "id": self.new_id(), "application_id": APPLICATION["id"], "type": 2,
            "token": f"interaction-token-{self._next_id}", "version": 1,
            "attachment_size_limit": 8 * 1024 * 1024, "locale": "en-US",
            "data": {"id": registered.get(name, "0"), "name": name, "type": 1},
            "channel_id": channel_id,
        }
        if guild_id is None:
            data["user"] = author
            data["channel"] = {"id": channel_id, "type": 1, "recipients": [author]}
        else:
            data["guild_id"] = guild_id
            data["channel"] = {"id": channel_id, "type": 0, "guild_id": guild_id, "name": "general",
                               "position": 0, "permission_overwrites": []}
            data["member"] = {"user": author, "roles": [], "joined_at": dtm.datetime.now(dtm.UTC).isoformat(),
                              "deaf": False, "mute": False, "flags": 0, "permissions": "0"}
        return data

    async def push_interaction(self, interaction: dict) -> None:
        await self._dispatch("INTERACTION_CREATE", interaction)

    def interaction_replies(self) -> list[dict[str, Any]]:
        """The bodies of interaction responses, in order."""
        return [c.json for c in self.calls if c.method == "POST" and c.path.startswith("/interactions/")]

    async def _dispatch(self, event: str, data: dict, ws: web.WebSocketResponse | None = None) -> None:
        """Send an event to `ws`, or to every connected client (as Discord does to every session)."""
        targets = [ws] if ws is not None else [w for w in self._sockets if not w.closed]
        assert targets, "no client connected"
        self._seq += 1
        for target in targets:
            await target.send_json({"op": 0, "t": event, "s": self._seq, "d": data})

    # -- the server ----------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.append(ws)
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": 41250}})  # HELLO
        async for frame in ws:
            if frame.type != WSMsgType.TEXT:
                break
            payload = frame.json()
            if payload["op"] == 2:  # IDENTIFY
                await self._dispatch("READY", {
                    "v": 10, "user": self.me, "guilds": [], "session_id": "s1",
                    "resume_gateway_url": f"ws://127.0.0.1:{self.port}/gateway",
                    "application": {"id": APPLICATION["id"], "flags": 0},
                }, ws)
                self.identified.set()
            elif payload["op"] == 6:  # RESUME after a dropped connection
                self.resumed += 1
                await self._dispatch("RESUMED", {}, ws)
            elif payload["op"] == 1:  # heartbeat
                await ws.send_json({"op": 11})
        return ws

    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["path"]
        body = await request.json() if request.can_read_body else None
        self.calls.append(Call(request.method, path, body))
        if self.token is not None and request.headers.get("Authorization") != f"Bot {self.token}":
            return _json({"message": "401: Unauthorized", "code": 0}, status=401)
        if request.method == "GET" and path == "/users/@me":
            return _json(self.me)
        if request.method == "GET" and path == "/oauth2/applications/@me":
            return _json(APPLICATION)
        if request.method == "PUT" and path == f"/applications/{APPLICATION['id']}/commands":
            self.commands = [{**c, "id": self.new_id(), "application_id": APPLICATION["id"],
                              "version": "1", "type": c.get("type", 1)} for c in body]
            return _json(self.commands)
        if request.method == "POST" and path.startswith("/interactions/"):
            return web.Response(status=204)
        if request.method == "POST" and path.endswith("/typing"):
            if self.forbid_typing:
                return _json({"message": "Missing Permissions", "code": 50013}, status=403)
            return web.Response(status=204)
        if request.method == "POST" and path.endswith("/messages"):
            if self.forbid_next_sends > 0:
                self.forbid_next_sends -= 1
                return _json({"message": "Missing Access", "code": 50001}, status=403)
            channel_id = path.split("/")[2]
            return _json(self.message(body.get("content", ""), BOT, channel_id))
        return _json({"message": "Unknown", "code": 0}, status=404)


def _json(data: Any, status: int = 200) -> web.Response:
    # discord.py parses a body as JSON only when Content-Type is exactly application/json.
    return web.Response(body=json.dumps(data).encode(), status=status,
                        headers={"Content-Type": "application/json"})
