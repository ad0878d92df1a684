"""The owner's console: a local web page (and the JSON API under it) where the person being
cloned talks to their clone, corrects it, teaches it and manages its adapters.

    Console     what the page and the API do, over the same Engine the bots use (platform
                "console", channel "owner"): chat (with what each reply drew on, from the engine's
                on_prompt hook), corrections (training.corrections), adapters (activate = roll back
                or forward, and the answering model follows), knowledge notes (re-indexed without
                retraining), `clone retrain` in its own process (bot.console_retrain), the
                `clone eval` reports across versions (bot.console_evals)
    API         JSON under /api/, for scripts (Authorization: Bearer); the retrain's progress also
                as server-sent events, which the page follows
    page        server-rendered HTML with a vendored htmx (bot.console_ui): nothing from a CDN
    auth        bot.console_auth: the token, login sessions, CSRF

Message text, corrections and notes are never logged: this module logs nothing at all.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from aiohttp import web

from bot import console_evals
from bot.console_auth import COOKIE, Auth, security_headers
from bot.console_retrain import RetrainRun
from bot.engine import BUSY_REPLY, UNAVAILABLE_REPLY, Incoming
from bot.memory import ChannelKey, MemoryUnavailable
from bot.runtime import Runtime, index_folder
from training import adapters, corrections, knowledge
from training.atomic import atomic_file
from training.prompt import Recalled

PLATFORM, CHANNEL, OWNER = "console", "owner", "owner"
MAX_REPLIES = 500  # replies kept for correcting, while the console runs
MAX_BODY = 1 << 20
HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies and the browser from timing out
EVENTS_EVERY_S = 0.25  # a tqdm bar redraws ~10 times a second: send at most 4 statuses a second
STATIC = Path(__file__).parent / "console_static"


class ConsoleError(Exception):
    """A request the console refuses: an HTTP status and one line for the owner."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Reply:
    """One answer of the clone, as the owner may correct it."""

    id: str
    messages: list[str]
    context: list[dict[str, str]]  # the prompt's conversation turns, the owner's message last
    recalled: list[Recalled]

    def drew_on(self) -> list[str]:
        return [r.line().removeprefix("- ") for r in self.recalled]

    def as_json(self) -> dict:
        return {"id": self.id, "messages": self.messages, "recalled": self.drew_on()}


@dataclass
class ConsoleOptions:
    token: str
    retrain_argv: list[str]
    retrain_env: dict[str, str] | None = None
    # Re-index the notes (blocking, run in a thread); a line saying what was done.
    reindex: Callable[[], str] | None = None
    # Load the adapter that is now active into the answering backend; whether it changed.
    follow: Callable[[], Awaitable[bool]] | None = None
    follow_every_s: float = 10.0


class Console:
    def __init__(self, runtime: Runtime, options: ConsoleOptions) -> None:
        self.runtime, self.options = runtime, options
        self.engine = runtime.engine
        self.persona = self.engine.persona
        assert self.persona.root is not None and self.persona.adapters is not None
        self.serving = runtime.what
        self.corrections_path = corrections.corrections_file(self.persona.root)
        self.replies: OrderedDict[str, Reply] = OrderedDict()
        self.retrain = RetrainRun(options.retrain_argv, options.retrain_env)
        self._prompts: dict[ChannelKey, tuple[list[dict[str, str]], list[Recalled]]] = {}
        self._notes_lock = asyncio.Lock()
        self.engine.on_prompt = self._keep_prompt

    def _keep_prompt(self, key: ChannelKey, prompt: list[dict[str, str]], recalled: list[Recalled]) -> None:
        self._prompts[key] = (prompt, recalled)

    # -- chat ------------------------------------------------------------------------------------

    async def chat(self, text: str) -> Reply:
        if not text.strip():
            raise ConsoleError(400, "say something first")
        key = self.engine.key(PLATFORM, CHANNEL)
        async with self.engine.in_order(PLATFORM, CHANNEL):  # the hook's record is this message's
            self._prompts.pop(key, None)
            messages = await self.engine.handle(Incoming(PLATFORM, CHANNEL, OWNER, OWNER, text.strip()))
            prompt, recalled = self._prompts.pop(key, ([], []))
        context = [m for m in prompt if m["role"] != "system"]
        reply = Reply(uuid.uuid4().hex, messages, context, list(recalled))
        self.replies[reply.id] = reply
        while len(self.replies) > MAX_REPLIES:
            self.replies.popitem(last=False)
        return reply

    async def new_conversation(self) -> None:
        try:
            await self.engine.reset(PLATFORM, CHANNEL)
        except MemoryUnavailable:
            raise ConsoleError(503, "memory unavailable: the conversation could not be forgotten") from None

    # -- corrections -----------------------------------------------------------------------------

    async def correct(self, reply_id: str, text: str | None = None, rating: str | None = None) -> dict:
        reply = self.replies.get(reply_id)
        if reply is None:
            raise ConsoleError(404, "no such reply (replies can be corrected while the console runs)")
        if reply.messages in ([BUSY_REPLY], [UNAVAILABLE_REPLY]):  # not the clone's words: nothing to learn
            raise ConsoleError(409, "that was an apology (the model could not answer), not a reply")
        try:
            return await asyncio.to_thread(
                corrections.add, self.corrections_path, reply_id=reply.id, context=reply.context,
                reply="\n".join(reply.messages), text=text, rating=rating,
                recalled=[asdict(r) for r in reply.recalled])
        except corrections.CorrectionError as e:
            raise ConsoleError(400, str(e)) from None

    async def list_corrections(self) -> list[dict]:
        """Newest first."""
        return (await asyncio.to_thread(corrections.load, self.corrections_path))[::-1]

    async def edit_correction(self, correction_id: str, text: str | None, rating: str | None) -> dict:
        try:
            return await asyncio.to_thread(corrections.edit, self.corrections_path, correction_id,
                                           text=text, rating=rating)
        except corrections.CorrectionError as e:
            raise ConsoleError(400, str(e)) from None
        except KeyError:
            raise ConsoleError(404, "no such correction") from None

    async def delete_correction(self, correction_id: str) -> None:
        if not await asyncio.to_thread(corrections.delete, self.corrections_path, correction_id):
            raise ConsoleError(404, "no such correction")

    # -- adapters --------------------------------------------------------------------------------

    def adapters(self) -> list[dict]:
        """Newest first, each with its metrics and whether it is the active one."""
        root = self.persona.adapters
        assert root is not None
        active = adapters.active_version(root)
        return [{
            "version": a["version"], "created": a.get("created"), "active": a["version"] == active,
            "metrics": a.get("metrics") or {}, "base_model": (a.get("base_model") or {}).get("id"),
            "dataset": (a.get("dataset") or {}).get("fingerprint"),
        } for a in adapters.versions(root)[::-1]]

    async def activate(self, version: str) -> dict:
        root = self.persona.adapters
        assert root is not None
        if version not in {a["version"] for a in adapters.versions(root)}:
            raise ConsoleError(404, f"no adapter {version!r}")
        try:
            adapters.resolve(root, version, self.persona.id)
        except adapters.AdapterError as e:
            raise ConsoleError(409, str(e)) from None
        adapters.activate(root, version)
        await self.follow()
        return {"active": version, "serving": self.serving}

    async def follow(self) -> None:
        """The answering model follows `active` (unless a version was pinned, or it is remote),
        and recall the index that came with it."""
        if self.options.follow is not None and await self.options.follow():
            self.serving = f"adapter {adapters.active_version(self.persona.adapters)}"
            recaller = self.runtime.recaller
            if recaller is not None and recaller.index is not None:
                recaller.index.folder = index_folder(self.persona, None)
                recaller.index.refresh(force=True)

    async def follow_forever(self) -> None:
        while True:  # `clone adapters use` in a terminal, or the retrain this console started
            await asyncio.sleep(self.options.follow_every_s)
            await self.follow()

    # -- evaluation reports ----------------------------------------------------------------------

    def evals(self) -> list[dict]:
        """Every adapter, newest first, with its `clone eval` figures (bot.console_evals)."""
        assert self.persona.adapters is not None
        return console_evals.history(self.persona.adapters)

    def plot(self, version: str, name: str) -> Path:
        assert self.persona.adapters is not None
        path = console_evals.plot_file(self.persona.adapters, version, name)
        if path is None:
            raise ConsoleError(404, "no such plot")
        return path

    # -- retrain ---------------------------------------------------------------------------------

    async def start_retrain(self) -> dict:
        if not await self.retrain.start():
            raise ConsoleError(409, "a retrain is already running")
        return self.retrain.status()

    # -- knowledge notes -------------------------------------------------------------------------

    def notes(self) -> list[dict]:
        folder = self.persona.knowledge
        found = []
        for path in knowledge.note_files(folder):
            try:
                text = knowledge.read_note(path)
            except knowledge.KnowledgeError as e:
                text = f"(unreadable: {e})"
            found.append({"name": str(path.relative_to(folder)), "text": text,
                          "passages": len(knowledge.passages(text))})
        return found

    async def save_note(self, text: str, name: str | None = None) -> str:
        """Add a note (no name) or rewrite one; then re-index. A line saying what was done."""
        text = text.strip()
        if not text:
            raise ConsoleError(400, "the note is empty")
        if len(text.encode("utf-8")) > knowledge.MAX_NOTE_BYTES:
            raise ConsoleError(400, "the note is too long: split it into several")
        folder = self.persona.knowledge
        assert folder is not None
        if name:
            path = next((p for p in knowledge.note_files(folder) if str(p.relative_to(folder)) == name), None)
            if path is None:
                raise ConsoleError(404, "no such note")
        else:
            path = new_note_path(folder)
        async with self._notes_lock:
            await asyncio.to_thread(write_note, path, text)
            done = await asyncio.to_thread(self.options.reindex) if self.options.reindex else "not re-indexed"
        if self.runtime.recaller is not None and self.runtime.recaller.index is not None:
            self.runtime.recaller.index.refresh(force=True)  # the next reply recalls the new note
        return f"Saved {path.relative_to(folder)}; {done}"


def new_note_path(folder: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = folder / f"note-{stamp}.md", 1
    while path.exists():
        n += 1
        path = folder / f"note-{stamp}-{n}.md"
    return path


def write_note(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text + "\n")


# -- the JSON API ---------------------------------------------------------------------------------

CONSOLE = web.AppKey("console", Console)
CLOSING = web.AppKey("closing", asyncio.Event)  # set when the server shuts down: streams end


async def json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ConsoleError(400, "the body must be a JSON object")
    return body


def text_or_rating(body: dict) -> tuple[str | None, str | None]:
    text, rating = body.get("text"), body.get("rating")
    if not isinstance(text, str | None) or not isinstance(rating, str | None):
        raise ConsoleError(400, "text and rating are strings")
    return text, rating


async def api_chat(request: web.Request) -> web.Response:
    body = await json_body(request)
    if not isinstance(body.get("text"), str):
        raise ConsoleError(400, 'send {"text": "..."}')
    reply = await request.app[CONSOLE].chat(body["text"])
    return web.json_response(reply.as_json())


async def api_add_correction(request: web.Request) -> web.Response:
    body = await json_body(request)
    if not isinstance(body.get("reply_id"), str):
        raise ConsoleError(400, 'send {"reply_id": "...", "text": "..."} or {"reply_id": "...", '
                                '"rating": "good"}')
    stored = await request.app[CONSOLE].correct(body["reply_id"], *text_or_rating(body))
    return web.json_response(stored, status=201)


async def api_corrections(request: web.Request) -> web.Response:
    return web.json_response(await request.app[CONSOLE].list_corrections())


async def api_edit_correction(request: web.Request) -> web.Response:
    text, rating = text_or_rating(await json_body(request))
    stored = await request.app[CONSOLE].edit_correction(request.match_info["id"], text, rating)
    return web.json_response(stored)


async def api_delete_correction(request: web.Request) -> web.Response:
    await request.app[CONSOLE].delete_correction(request.match_info["id"])
    return web.json_response({"deleted": request.match_info["id"]})


async def api_adapters(request: web.Request) -> web.Response:
    return web.json_response(request.app[CONSOLE].adapters())


async def api_activate(request: web.Request) -> web.Response:
    return web.json_response(await request.app[CONSOLE].activate(request.match_info["version"]))


async def api_start_retrain(request: web.Request) -> web.Response:
    return web.json_response(await request.app[CONSOLE].start_retrain(), status=202)


async def api_retrain(request: web.Request) -> web.Response:
    return web.json_response(request.app[CONSOLE].retrain.status())


async def api_retrain_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the retrain status (as GET /api/retrain) each time it changes, a
    comment every HEARTBEAT_S; the stream ends once no run is going (its final status sent) or
    when the server shuts down."""
    run, closing = request.app[CONSOLE].retrain, request.app[CLOSING]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
    await response.prepare(request)
    sent: dict | None = None
    try:
        while not closing.is_set():
            seen, status = run.revision, run.status()
            if status != sent:
                await response.write(f"data: {json.dumps(status)}\n\n".encode())
                sent = status
            if status["state"] != "running":
                break
            await asyncio.sleep(EVENTS_EVERY_S)  # changes meanwhile are sent together, once
            if not await run.changed(seen, HEARTBEAT_S):
                await response.write(b": heartbeat\n\n")
        await response.write_eof()
    except ConnectionResetError:  # the page went away: nothing more to send
        pass
    return response


async def api_evals(request: web.Request) -> web.Response:
    return web.json_response([r for r in request.app[CONSOLE].evals() if r["evaluated"]])


async def api_eval_plot(request: web.Request) -> web.FileResponse:
    path = request.app[CONSOLE].plot(request.match_info["version"], request.match_info["name"])
    return web.FileResponse(path, headers={"Content-Type": "image/png"})


async def api_notes(request: web.Request) -> web.Response:
    return web.json_response(request.app[CONSOLE].notes())


async def api_save_note(request: web.Request) -> web.Response:
    body = await json_body(request)
    text, name = body.get("text"), body.get("name")
    if not isinstance(text, str) or not isinstance(name, str | None):
        raise ConsoleError(400, 'send {"text": "..."} (and "name" to rewrite a note)')
    return web.json_response({"done": await request.app[CONSOLE].save_note(text, name)})


API_ROUTES = [
    web.post("/api/chat", api_chat),
    web.post("/api/corrections", api_add_correction),
    web.get("/api/corrections", api_corrections),
    web.put("/api/corrections/{id}", api_edit_correction),
    web.delete("/api/corrections/{id}", api_delete_correction),
    web.get("/api/adapters", api_adapters),
    web.post("/api/adapters/{version}/activate", api_activate),
    web.post("/api/retrain", api_start_retrain),
    web.get("/api/retrain", api_retrain),
    web.get("/api/retrain/events", api_retrain_events),
    web.get("/api/evals", api_evals),
    web.get("/api/evals/{version}/plots/{name}", api_eval_plot),
    web.get("/api/notes", api_notes),
    web.post("/api/notes", api_save_note),
]


@web.middleware
async def refusals(request: web.Request, handler) -> web.StreamResponse:
    """A ConsoleError as JSON (API) or as a notice the page shows (htmx)."""
    try:
        return await handler(request)
    except ConsoleError as e:
        if request.path.startswith("/api/"):
            return web.json_response({"error": e.message}, status=e.status)
        from bot.console_ui import notice

        return notice(e.message, e.status)


def build_app(console: Console) -> web.Application:
    from bot import console_ui

    auth = Auth(console.options.token, console_ui.login_page, f"{COOKIE}_{console.persona.id}")
    app = web.Application(middlewares=[auth.middleware, refusals], client_max_size=MAX_BODY)
    app[CONSOLE] = console
    app[CLOSING] = asyncio.Event()
    app.on_response_prepare.append(security_headers)
    app.router.add_routes(auth.routes() + API_ROUTES + console_ui.ROUTES)
    app.router.add_static("/static/", STATIC)

    async def background(app: web.Application):
        task = asyncio.create_task(console.follow_forever())
        yield
        task.cancel()
        await console.retrain.stop()

    async def end_streams(app: web.Application) -> None:
        # Before the server waits for open requests (up to a minute): an event stream would
        # otherwise hold the shutdown until its retrain ends.
        app[CLOSING].set()
        console.retrain.wake()

    app.cleanup_ctx.append(background)
    app.on_shutdown.append(end_streams)
    return app


async def serve(console: Console, host: str, port: int, started: Callable[[], None] | None = None) -> None:
    """Serve until cancelled (Ctrl-C); the runtime is closed by the caller."""
    runner = web.AppRunner(build_app(console), access_log=None)  # paths only, but no need for them
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        if started is not None:
            started()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
