"""A local fake of the Telegram Bot API, enough to drive python-telegram-bot's real client.

Requests arrive at /bot<TOKEN>/<method> (PTB's base_url + token), form-encoded or JSON. Every call
is recorded; updates can be queued; the next N sendMessage calls can be answered with HTTP 429,
and the next N calls of a method can have their connection dropped.

getUpdates works as the real Bot API's: an update is confirmed (and never sent again) once a call
carries an `offset` above its id, until then every call returns it again (at most `limit`); a long
poll waits only while there is nothing unconfirmed; and a getUpdates while another one waits ends
the waiting one with 409 Conflict, as when two processes poll one bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.platform_helpers import free_port

BOT = {"id": 999, "is_bot": True, "first_name": "Sam clone", "username": "sam_clone_bot",
       "can_join_groups": True, "can_read_all_group_messages": False,
       "supports_inline_queries": False}


@dataclass
class Call:
    method: str
    params: dict[str, Any]


@dataclass
class FakeTelegram:
    token: str = "123:TEST"
    calls: list[Call] = field(default_factory=list)
    rate_limit_next: int = 0  # answer this many coming sendMessage calls with a 429
    me: dict[str, Any] = field(default_factory=lambda: dict(BOT))  # what getMe answers
    drop_next: dict[str, int] = field(default_factory=dict)  # method -> calls to hang up on
    confirmed: list[int] = field(default_factory=list)  # update ids confirmed, in order
    queued: dict[int, dict[str, Any]] = field(default_factory=dict)  # every update ever queued, by id
    conflicts: int = 0  # long polls ended by another getUpdates
    _updates: list[dict[str, Any]] = field(default_factory=list)
    _next_update_id: int = 1
    _next_message_id: int = 1000
    _runner: web.AppRunner | None = None
    _waiting: asyncio.Future | None = None  # the long poll in progress
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    async def start(self) -> None:
        self._arrived = asyncio.Event()
        app = web.Application()
        app.router.add_post("/bot{token}/{method}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        self.port = self.port or free_port()  # a fixed port: a server that comes up late
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    def queue(self, message: dict[str, Any], kind: str = "message") -> int:
        """Queue an update carrying `message` (`kind`: "message", "edited_message"); its update_id."""
        update_id = self._next_update_id
        self._next_update_id += 1
        self._updates.append({"update_id": update_id, kind: message})
        self.queued[update_id] = self._updates[-1]
        self._arrived.set()
        return update_id

    def sent(self, method: str = "sendMessage", chat_id: int | None = None) -> list[dict[str, Any]]:
        return [c.params for c in self.calls if c.method == method
                and (chat_id is None or str(c.params.get("chat_id")) == str(chat_id))]

    async def _handle(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.json_response({"ok": False, "error_code": 401,
                                      "description": "Unauthorized"}, status=401)
        method = request.match_info["method"]
        if request.content_type == "application/json":
            params = await request.json() if request.can_read_body else {}
        else:
            params = dict(await request.post())
        self.calls.append(Call(method, params))
        if self.drop_next.get(method, 0) > 0:  # a dropped connection: no answer at all
            self.drop_next[method] -= 1
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)  # never reaches the client
        if method == "getUpdates":
            return await self._get_updates(params)
        if method == "sendMessage":
            if self.rate_limit_next > 0:
                self.rate_limit_next -= 1
                return web.json_response(
                    {"ok": False, "error_code": 429, "description": "Too Many Requests",
                     "parameters": {"retry_after": 1}}, status=429)
            return _ok(self._message(params))
        if method == "getMe":
            return _ok(self.me)
        if method == "getMyCommands":
            return _ok([])
        return _ok(True)

    def unconfirmed(self) -> list[int]:
        return [u["update_id"] for u in self._updates]

    async def _get_updates(self, params: dict[str, Any]) -> web.Response:
        offset = int(params.get("offset") or 0)
        self.confirmed += [u["update_id"] for u in self._updates if u["update_id"] < offset]
        self._updates = [u for u in self._updates if u["update_id"] >= offset]
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)  # "terminated by other getUpdates request"
        if not self._updates:
            # A short long-poll: PTB asks again at once, so tests stay quick.
            self._arrived.clear()
            self._waiting = waiting = asyncio.get_running_loop().create_future()
            arrived = asyncio.ensure_future(self._arrived.wait())
            timeout = min(float(params.get("timeout") or 0), 0.5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.wait({waiting, arrived}, return_when="FIRST_COMPLETED"),
                                       timeout)
            arrived.cancel()
            if waiting.done():
                self.conflicts += 1
                return web.json_response({"ok": False, "error_code": 409, "description":
                                          "Conflict: terminated by other getUpdates request"}, status=409)
            waiting.cancel()
        return _ok(self._updates[:int(params.get("limit") or 100)])

    def _message(self, params: dict[str, Any]) -> dict[str, Any]:
        self._next_message_id += 1
        chat_id = int(params["chat_id"])
        return {"message_id": self._next_message_id, "date": 0, "from": BOT,
                "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "group"},
                "text": str(params.get("text", ""))}


def _ok(result: Any) -> web.Response:
    return web.Response(text=json.dumps({"ok": True, "result": result}),
                        content_type="application/json")
