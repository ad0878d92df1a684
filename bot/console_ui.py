"""The console's page: server-rendered HTML (Jinja2, autoescaped) that htmx updates in place.

Every action posts a form to /ui/... and gets back the HTML of what changed (a reply, the
corrections list, the adapters table), sometimes with a second part swapped out of band. A
refused action answers with a notice, retargeted to the page's notice line. No script but
htmx and console.js runs: the Content-Security-Policy allows only the page's own files.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from jinja2 import Environment, FileSystemLoader, select_autoescape

from bot import console_evals
from bot.console import CONSOLE, Console, ConsoleError
from bot.console_auth import SESSION
from training import adapters

TEMPLATES = Path(__file__).parent / "console_templates"
_env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(default=True),
                   trim_blocks=True, lstrip_blocks=True)
# 4xx answers are swapped too (into the notice line, where they are retargeted); eval stays off
# (no inline script may run), and htmx adds no <style> of its own: console.css styles the indicator.
HTMX_CONFIG = {
    "includeIndicatorStyles": False, "allowEval": False, "allowScriptTags": False,
    "responseHandling": [{"code": "204", "swap": False}, {"code": "[23]..", "swap": True},
                         {"code": "4..", "swap": True, "error": True}, {"code": "...", "swap": False,
                                                                         "error": True}],
}


def render(template: str, **values) -> str:
    return _env.get_template(template).render(**values)


def html(template: str, status: int = 200, **values) -> web.Response:
    return web.Response(text=render(template, **values), status=status, content_type="text/html")


def login_page(message: str | None) -> str:
    return render("login.html", message=message)


def notice(message: str, status: int) -> web.Response:
    response = html("notice.html", status, message=message)
    response.headers.update({"HX-Retarget": "#notice", "HX-Reswap": "innerHTML"})
    return response


def eval_values(console: Console) -> dict:
    """What evals.html shows: the report of the active adapter (else the newest evaluated), every
    version's figures, and the chart of them."""
    rows = console.evals()
    return {"evals": rows, "report": console_evals.shown(rows), "chart": console_evals.chart(rows),
            "active": adapters.active_version(console.persona.adapters), "plot_titles": console_evals.PLOTS}


def shown_corrections(found: list[dict]) -> list[dict]:
    """Each correction with the message it answered (the last of the owner's turns)."""
    return [dict(c, asked=next((m["content"] for m in reversed(c.get("context") or [])
                                if m.get("role") == "user"), None)) for c in found]


async def page(request: web.Request) -> web.Response:
    console: Console = request.app[CONSOLE]
    session = request.get(SESSION)
    return html("page.html", name=console.persona.name, serving=console.serving,
                csrf=session.csrf if session is not None else "", htmx_config=HTMX_CONFIG,
                corrections=shown_corrections(await console.list_corrections()),
                adapters=console.adapters(), r=console.retrain.status(), notes=console.notes(),
                **eval_values(console))


async def form_text(request: web.Request, name: str) -> str | None:
    value = (await request.post()).get(name)
    return value if isinstance(value, str) else None


async def chat(request: web.Request) -> web.Response:
    console: Console = request.app[CONSOLE]
    text = await form_text(request, "text") or ""
    reply = await console.chat(text)
    return html("exchange.html", text=text.strip(), reply=reply, recall=console.runtime.recaller is not None)


async def reset(request: web.Request) -> web.Response:
    await request.app[CONSOLE].new_conversation()
    return html("hint.html")


async def correct(request: web.Request) -> web.Response:
    console: Console = request.app[CONSOLE]
    form = await request.post()
    reply = console.replies.get(str(form.get("reply_id", "")))
    if reply is None:
        raise ConsoleError(404, "that reply is no longer kept (the console was restarted)")
    text, rating = form.get("text"), form.get("rating")
    stored = await console.correct(reply.id, text if isinstance(text, str) else None,
                                   rating if isinstance(rating, str) else None)
    saved = f"Saved: rated {stored['rating']}." if "rating" in stored else "Saved your version."
    return html("feedback.html", reply=reply, saved=saved, oob=True,
                corrections=shown_corrections(await console.list_corrections()))


async def edit_correction(request: web.Request) -> web.Response:
    console: Console = request.app[CONSOLE]
    form = await request.post()
    text, rating = form.get("text"), form.get("rating")
    await console.edit_correction(request.match_info["id"], text if isinstance(text, str) else None,
                                  rating if isinstance(rating, str) else None)
    return html("corrections.html", corrections=shown_corrections(await console.list_corrections()))


async def delete_correction(request: web.Request) -> web.Response:
    console: Console = request.app[CONSOLE]
    await console.delete_correction(request.match_info["id"])
    return html("corrections.html", corrections=shown_corrections(await console.list_corrections()))


async def activate(request: web.Request) -> web.Response:
    console: Console = request.app[CONSOLE]
    await console.activate(request.match_info["version"])
    return html("adapters.html", adapters=console.adapters(), serving=console.serving, oob=True,
                **eval_values(console))


async def retrain(request: web.Request) -> web.Response:
    console: Console = request.app[CONSOLE]
    if request.method == "POST":
        await console.start_retrain()
    status = console.retrain.status()
    finished = status["state"] != "running"  # the adapters, and so the reports, may have changed
    return html("retrain.html", r=status, oob=finished, adapters=console.adapters(), serving=console.serving,
                **(eval_values(console) if finished else {}))


async def save_note(request: web.Request) -> web.Response:
    console: Console = request.app[CONSOLE]
    form = await request.post()
    text, name = form.get("text"), form.get("name")
    if not isinstance(text, str):
        raise ConsoleError(400, "the note is empty")
    done = await console.save_note(text, name if isinstance(name, str) and name else None)
    return html("notes.html", notes=console.notes(), done=done)


ROUTES = [
    web.get("/", page),
    web.post("/ui/chat", chat),
    web.post("/ui/reset", reset),
    web.post("/ui/corrections", correct),
    web.post("/ui/corrections/{id}", edit_correction),
    web.delete("/ui/corrections/{id}", delete_correction),
    web.post("/ui/adapters/{version}/activate", activate),
    web.get("/ui/retrain", retrain),
    web.post("/ui/retrain", retrain),
    web.post("/ui/notes", save_note),
]
