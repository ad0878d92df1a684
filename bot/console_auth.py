"""Who may use the owner's console: whoever holds CLONE_CONSOLE_TOKEN.

    API      `Authorization: Bearer <token>` on every call (not CSRF-prone: a browser never adds
             it on its own)
    page     a login form takes the token once and sets a session cookie: a random id mapped to
             the session here (never the token itself), HttpOnly, SameSite=Strict; every POST,
             PUT and DELETE made with the cookie must also carry the session's CSRF token in
             X-CSRF-Token (the page's htmx sends it), so another site can neither read nor forge
             a request even in a browser that ignores SameSite
    neither  401, with the login form (page) or one line (API): nothing of the persona

Tokens are compared in constant time and never logged; a wrong token costs a second.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

COOKIE = "clone_console"  # + the persona's id: consoles of two personas on one host keep their logins
CSRF_HEADER = "X-CSRF-Token"
SESSION_S = 12 * 3600
MAX_SESSIONS = 32
WRONG_TOKEN_DELAY_S = 1.0
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PUBLIC_PREFIXES = ("/static/",)
# The page loads only its own script and style, and may not be framed (clickjacking).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Session:
    csrf: str
    expires: float


# Where a request made with the cookie keeps its session (the page shows its CSRF token).
SESSION: Any = web.RequestKey("session", Session) if hasattr(web, "RequestKey") else "session"


def same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


class Auth:
    def __init__(self, token: str, login_page: Callable[[str | None], str], cookie: str = COOKIE) -> None:
        self._token = token
        self.login_page, self.cookie = login_page, cookie
        self._sessions: dict[str, Session] = {}

    def __repr__(self) -> str:  # never the token, not even in a traceback's locals
        return f"Auth(sessions={len(self._sessions)})"

    def token_ok(self, given: str) -> bool:
        return same(given, self._token)

    def open_session(self) -> tuple[str, Session]:
        now = time.time()
        self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
        while len(self._sessions) >= MAX_SESSIONS:  # the oldest login goes
            self._sessions.pop(next(iter(self._sessions)))
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = Session(secrets.token_urlsafe(32), now + SESSION_S)
        return sid, self._sessions[sid]

    def session_of(self, request: web.Request) -> Session | None:
        session = self._sessions.get(request.cookies.get(self.cookie, ""))
        return session if session is not None and session.expires > time.time() else None

    def close_session(self, request: web.Request) -> None:
        self._sessions.pop(request.cookies.get(self.cookie, ""), None)

    def refused(self, request: web.Request, status: int = 401) -> web.Response:
        if request.path.startswith("/api/"):
            why = "unauthorized" if status == 401 else "forbidden: missing or wrong X-CSRF-Token"
            return web.json_response({"error": why}, status=status,
                                     headers={"WWW-Authenticate": 'Bearer realm="clone console"'})
        if status == 401 and request.method == "GET":
            return web.Response(text=self.login_page(None), status=401, content_type="text/html")
        return web.Response(text="Log in again.", status=status, headers={"HX-Redirect": "/login"})

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/login" or request.path.startswith(PUBLIC_PREFIXES):
            return await handler(request)
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not self.token_ok(given.strip()):
                return self.refused(request)
            return await handler(request)
        session = self.session_of(request)
        if session is None:
            return self.refused(request)
        if request.method in UNSAFE and not same(request.headers.get(CSRF_HEADER, ""), session.csrf):
            return self.refused(request, 403)
        request[SESSION] = session
        return await handler(request)

    async def login_form(self, request: web.Request) -> web.Response:
        return web.Response(text=self.login_page(None), content_type="text/html")

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        if not self.token_ok(str(form.get("token", ""))):
            await asyncio.sleep(WRONG_TOKEN_DELAY_S)
            return web.Response(text=self.login_page("That is not the console's token."), status=401,
                                content_type="text/html")
        sid, _ = self.open_session()
        response = web.Response(status=303, headers={"Location": "/"})
        response.set_cookie(self.cookie, sid, httponly=True, samesite="Strict", path="/")
        return response

    async def logout(self, request: web.Request) -> web.Response:
        self.close_session(request)
        response = web.Response(text="", headers={"HX-Redirect": "/login"})
        response.del_cookie(self.cookie, path="/")
        return response

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/login", self.login_form), web.post("/login", self.login),
                web.post("/logout", self.logout)]


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every response: the headers above; nothing of the persona kept in a cache."""
    response.headers.update(SECURITY_HEADERS)
    if not request.path.startswith(PUBLIC_PREFIXES):
        response.headers["Cache-Control"] = "no-store"
