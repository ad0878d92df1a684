"""The owner's console (`clone console`): the corrections store on its own, then the real server
over a real port with the real engine on the tiny llama (two tiny adapters to switch between):
what is refused without the token, chat, corrections stored, listed, edited and deleted, the
page's session and CSRF rules, adapter switching, knowledge notes, retrain status and progress
(polled and as server-sent events), the eval reports across versions, and no message text in any
log. A real browser drives the page at the end of this file."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.platform_helpers import free_port
from training import adapters, corrections
from training.persona import Persona
from training.prompt import CONTRACT_VERSION

REPO = Path(__file__).resolve().parent.parent
TOKEN = "test-console-token-0123456789"
PLANTED = "PLANTED-c0n5o1e-private-words"
# Stands in for `clone retrain`: prints what it does and a tqdm bar as the Trainer draws it.
# Arguments: its exit code, and the seconds each of its three steps takes.
FAKE_RETRAIN = r"""
import sys, time
print("Persona Sam [sam] in persona", flush=True)
for step in range(1, 4):
    sys.stderr.write(f"\r{step * 33}%|###   | {step}/3 [00:0{step}<00:01,  2.00it/s, loss=1.2]")
    sys.stderr.flush()
    time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0.3)
sys.stderr.write("\n")
print("Active adapter: 20990101-000000")
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""


# -- the corrections store alone ------------------------------------------------------------------


CONTEXT = [{"role": "user", "content": "are you coming tonight?"}]


def test_corrections_are_added_listed_edited_and_deleted(tmp_path):
    path = corrections.corrections_file(tmp_path)
    a = corrections.add(path, reply_id="r1", context=CONTEXT, reply="maybe", text="yes!! see you at 8")
    b = corrections.add(path, reply_id="r2", context=CONTEXT, reply="no", rating="bad",
                        recalled=[{"text": "I love parties", "asked": None, "speaker": None}])
    assert [c["id"] for c in corrections.load(path)] == [a["id"], b["id"]]
    assert a["context"] == CONTEXT and a["reply"] == "maybe" and a["text"] == "yes!! see you at 8"
    assert "rating" not in a and b["rating"] == "bad" and "text" not in b
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # private: the owner's words

    edited = corrections.edit(path, a["id"], text="yes, at 8")
    assert edited["text"] == "yes, at 8" and edited["created"] == a["created"] and "edited" in edited
    assert corrections.edit(path, b["id"], rating="good")["rating"] == "good"
    assert corrections.delete(path, a["id"]) is True
    assert corrections.delete(path, a["id"]) is False
    assert [c["id"] for c in corrections.load(path)] == [b["id"]]
    with pytest.raises(KeyError):
        corrections.edit(path, "nope", text="x")
    assert not list(tmp_path.glob(".corrections.jsonl.*.tmp"))  # rewrites leave no temporary behind


@pytest.mark.parametrize("text, rating, why", [
    (None, None, "either"), ("x", "good", "either"), ("  ", None, "empty"), (None, "meh", "rating"),
    ("x" * (corrections.MAX_TEXT_CHARS + 1), None, "longer"),
])
def test_a_malformed_correction_is_refused_and_nothing_is_written(tmp_path, text, rating, why):
    path = corrections.corrections_file(tmp_path)
    with pytest.raises(corrections.CorrectionError, match=why):
        corrections.add(path, reply_id="r", context=CONTEXT, reply="hi", text=text, rating=rating)
    assert corrections.load(path) == []


def test_a_torn_last_line_is_skipped_and_never_glued_to_the_next(tmp_path):
    path = corrections.corrections_file(tmp_path)
    first = corrections.add(path, reply_id="r1", context=CONTEXT, reply="a", text="b")
    with open(path, "a") as f:
        f.write('{"id": "torn", "cont')  # a crash in the middle of a write
    second = corrections.add(path, reply_id="r2", context=CONTEXT, reply="c", rating="good")
    assert [c["id"] for c in corrections.load(path)] == [first["id"], second["id"]]


def test_appends_from_many_threads_and_a_rewrite_lose_nothing(tmp_path):
    path = corrections.corrections_file(tmp_path)
    doomed = corrections.add(path, reply_id="r0", context=CONTEXT, reply="a", text="b")

    def write(n: int) -> None:
        for i in range(10):
            corrections.add(path, reply_id=f"t{n}-{i}", context=CONTEXT, reply="a", text=f"{n}-{i}")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    corrections.delete(path, doomed["id"])  # a rewrite among the appends
    for t in threads:
        t.join()
    assert sorted(c["text"] for c in corrections.load(path)) == sorted(f"{n}-{i}" for n in range(4)
                                                                      for i in range(10))


# -- retrain runs, alone ------------------------------------------------------------------------


def test_a_retrain_run_reports_its_progress_exit_code_and_last_lines(tmp_path):
    from bot.console_retrain import RetrainRun

    script = tmp_path / "fake_retrain.py"
    script.write_text(FAKE_RETRAIN)

    async def scenario():
        run = RetrainRun([sys.executable, str(script), "3"])
        assert run.status()["state"] == "idle"
        assert await run.start() is True
        assert await run.start() is False  # one at a time
        assert run.status()["state"] == "running"
        while run.running:
            await asyncio.sleep(0.05)
        return run.status()

    status = asyncio.run(scenario())
    assert status["state"] == "failed" and status["exit_code"] == 3
    assert status["progress"] == {"step": 3, "total": 3}
    assert status["lines"] == ["Persona Sam [sam] in persona", "Active adapter: 20990101-000000"]


def test_the_consoles_retrain_command_is_the_real_clone_retrain_and_its_bar_is_read(tiny_base, tmp_path):
    """What `clone console` starts: `clone retrain` for its persona and base model, end to end."""
    from bot.console_retrain import RetrainRun
    from cli.common import Session
    from cli.console import retrain_command
    from cli.settings import load_settings
    from tests.test_recall import chat_csv

    root = tmp_path / "sam"
    (root / "exports").mkdir(parents=True)
    (root / "persona.toml").write_text('name = "Sam"\nme = ["Sam"]\n')
    (root / "exports" / "chat.csv").write_text(chat_csv())
    session = Session(load_settings(), Persona.load(root))
    argv = [*retrain_command(session, argparse.Namespace(base=str(tiny_base))), "--max-steps", "2"]
    bars = []

    class Recorded(RetrainRun):
        """Keeps every bar it reads: polling could miss one, a tiny model's steps are quick."""

        def _take(self, line: str) -> None:
            super()._take(line)
            if self.bar and self.bar not in bars:
                bars.append(self.bar)

    async def scenario():
        run = Recorded(argv)
        await run.start()
        while run.running:
            await asyncio.sleep(0.05)
        return run.status()

    status = asyncio.run(scenario())
    assert status["state"] == "finished", status["lines"]
    assert status["progress"] == {"step": 2, "total": 2}
    assert any(" 0/2 [" in bar for bar in bars)  # the trainer's bar was followed from its start
    assert status["lines"][-1] == f"Active adapter: {adapters.active_version(root / 'adapters')}"


# -- the server, with the real engine ------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_base, tiny_dataset, tmp_path_factory) -> Path:
    """A persona folder with a dataset, a note and two tiny adapters (the second active), for
    each test that changes it to copy."""
    from training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("trained") / "sam"
    (root / "knowledge").mkdir(parents=True)
    (root / "persona.toml").write_text('name = "Sam"\nme = ["u1"]\n')
    (root / "knowledge" / "bio.md").write_text("I work night shifts as a nurse.\n")
    shutil.copytree(tiny_dataset, root / "dataset")
    persona = Persona.load(root)
    for seed in (0, 1):
        train(TrainConfig(data=root / "dataset", out=root / "adapters", base=str(tiny_base), max_steps=1,
                          batch_size=2, eval_steps=100, save_steps=100, seed=seed, persona_id=persona.id,
                          persona_name=persona.name))
    return root


def copied(trained: Path, into: Path) -> Persona:
    shutil.copytree(trained, into / "sam", symlinks=True)  # `active` stays a relative link
    return Persona.load(into / "sam")


@pytest.fixture(scope="module")
def persona(trained, tmp_path_factory) -> Persona:
    return copied(trained, tmp_path_factory.mktemp("console"))


@contextlib.contextmanager
def serving(console, port: int) -> Iterator[None]:
    """The console's server on 127.0.0.1:`port`, in a thread with its own event loop."""
    from bot.console import serve

    ready, box = threading.Event(), {}

    async def run() -> None:
        box["loop"], box["task"] = asyncio.get_running_loop(), asyncio.current_task()
        try:
            await serve(console, "127.0.0.1", port, ready.set)
        finally:
            await console.runtime.close()

    def main() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            asyncio.run(run())

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert ready.wait(60), "the console did not start"
    try:
        yield
    finally:
        box["loop"].call_soon_threadsafe(box["task"].cancel)
        thread.join(30)


@pytest.fixture(scope="module")
def console(persona, tiny_base, tmp_path_factory):
    """The console over build_runtime (recall off: fast), following the active adapter."""
    from bot.console import Console, ConsoleOptions
    from bot.generation import AdapterWatcher
    from bot.runtime import ModelChoice, RecallChoice, build_runtime

    folder = tmp_path_factory.mktemp("console-run")
    script = folder / "fake_retrain.py"
    script.write_text(FAKE_RETRAIN)
    runtime = build_runtime(persona, ModelChoice(base=str(tiny_base)), memory_file=folder / "memory.json",
                            recall=RecallChoice(enabled=False))
    runtime.backend.settings.max_new_tokens = 12
    watcher = AdapterWatcher(runtime.backend, persona.adapters, str(tiny_base), persona_id=persona.id)
    reindexed = []
    options = ConsoleOptions(TOKEN, [sys.executable, str(script)], follow=watcher.check, follow_every_s=3600,
                             reindex=lambda: reindexed.append(1) or "ok")
    made = Console(runtime, options)
    made.reindexed = reindexed  # type: ignore[attr-defined]
    port = free_port()
    with serving(made, port):
        made.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
        yield made


@pytest.fixture
def api(console) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=console.url, headers={"Authorization": f"Bearer {TOKEN}"},
                      timeout=60) as client:
        yield client


def test_without_the_token_nothing_of_the_persona_is_shown(console):
    versions = [a["version"] for a in adapters.versions(console.persona.adapters)]
    with httpx.Client(base_url=console.url, timeout=30) as anyone:
        page = anyone.get("/")
        assert page.status_code == 401 and 'name="token"' in page.text  # the login form
        for method, path in [("GET", "/api/corrections"), ("GET", "/api/adapters"), ("GET", "/api/retrain"),
                             ("POST", "/api/chat"), ("DELETE", "/api/corrections/x"),
                             ("POST", "/api/retrain"), ("GET", "/api/notes"), ("POST", "/ui/chat"),
                             ("GET", "/api/retrain/events"), ("GET", "/api/evals"),
                             ("GET", f"/api/evals/{versions[0]}/plots/loss.png")]:
            for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"},
                            {"Authorization": f"Basic {TOKEN}"}, {"Cookie": f"clone_console_sam={TOKEN}"}):
                r = anyone.request(method, path, headers=headers, json={"text": "hi"})
                assert r.status_code == 401, (method, path, headers)
                for private in ("Sam", "nurse", *versions):
                    assert private not in r.text
        assert anyone.get("/static/htmx.min.js").status_code == 200  # no persona data in it
    assert not (console.persona.root / "corrections.jsonl").exists()


def test_chat_then_corrections_stored_listed_edited_and_deleted(api, console):
    said = api.post("/api/chat", json={"text": "are you coming tonight?"}).json()
    assert set(said) >= {"id", "messages"} and said["messages"]
    assert all(isinstance(m, str) for m in said["messages"])
    assert said["recalled"] == []  # recall is off here

    fixed = api.post("/api/corrections", json={"reply_id": said["id"], "text": "yes!! see you at 8"})
    rated = api.post("/api/corrections", json={"reply_id": said["id"], "rating": "bad"})
    assert fixed.status_code == rated.status_code == 201
    fixed, rated = fixed.json(), rated.json()
    assert fixed["reply_id"] == said["id"] and fixed["text"] == "yes!! see you at 8"
    assert fixed["reply"] == "\n".join(said["messages"])
    assert fixed["context"][-1] == {"role": "user", "content": "are you coming tonight?"}
    assert rated["rating"] == "bad"
    listed = api.get("/api/corrections").json()
    assert [c["id"] for c in listed][:2] == [rated["id"], fixed["id"]]  # newest first
    stored = (console.persona.root / "corrections.jsonl").read_text().splitlines()
    on_disk = [json.loads(line) for line in stored]
    assert {c["id"] for c in on_disk} >= {fixed["id"], rated["id"]}

    assert api.put(f"/api/corrections/{fixed['id']}", json={"text": "yes, 8pm"}).json()["text"] == "yes, 8pm"
    assert api.delete(f"/api/corrections/{rated['id']}").status_code == 200
    ids = [c["id"] for c in api.get("/api/corrections").json()]
    assert fixed["id"] in ids and rated["id"] not in ids
    assert api.delete(f"/api/corrections/{rated['id']}").status_code == 404


@pytest.mark.parametrize("body, status", [
    ({"reply_id": "unknown", "text": "x"}, 404), ({"text": "x"}, 400), ("not an object", 400),
])
def test_a_bad_correction_is_refused_in_one_line(api, body, status):
    r = api.post("/api/corrections", json=body)
    assert r.status_code == status and set(r.json()) == {"error"}


def test_a_rating_must_be_good_or_bad(api):
    said = api.post("/api/chat", json={"text": "hello"}).json()
    r = api.post("/api/corrections", json={"reply_id": said["id"], "rating": "meh"})
    assert r.status_code == 400 and "rating" in r.json()["error"]
    assert api.post("/api/chat", json={"text": "   "}).status_code == 400


class Down:
    """A generation backend that is unreachable: a console without a model."""

    async def generate(self, messages):
        from bot.engine import Unavailable

        raise Unavailable("the generation server is unreachable")

    async def close(self) -> None:
        pass


def console_without_model(root: Path, retrain_argv: list[str]):
    """A Console over a Down backend: for what needs the persona folder or the retrain, not a
    model (quick to start, so each test may have its own)."""
    from bot.console import Console, ConsoleOptions
    from bot.engine import Engine
    from bot.gate import Gate, Rules
    from bot.memory import EmbeddedMemory
    from bot.runtime import Runtime

    persona = Persona.load(root)
    engine = Engine(persona, Down(), EmbeddedMemory(root / "memory.json"), lambda text: len(text) // 4 + 1)
    return Console(Runtime(engine, Down(), engine.memory, Gate(Rules(), persona.id), None, "down"),
                   ConsoleOptions(TOKEN, retrain_argv))


def test_an_apology_instead_of_a_reply_cannot_be_corrected(tmp_path):
    from bot.console import ConsoleError
    from bot.engine import UNAVAILABLE_REPLY

    (tmp_path / "persona.toml").write_text('name = "Sam"\n')
    console = console_without_model(tmp_path, [])

    async def scenario():
        reply = await console.chat("hello?")
        assert reply.messages == [UNAVAILABLE_REPLY]
        with pytest.raises(ConsoleError) as refused:
            await console.correct(reply.id, text="hey!")
        return refused.value.status

    assert asyncio.run(scenario()) == 409
    assert not corrections.corrections_file(tmp_path).exists()


def login(client: httpx.Client) -> str:
    """Log in through the form; the page's CSRF token."""
    r = client.post("/login", data={"token": TOKEN})
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    page = client.get("/")
    assert page.status_code == 200 and "Sam" in page.text
    assert 'src="http' not in page.text and 'href="http' not in page.text  # works offline: no CDN
    assert page.headers["cache-control"] == "no-store"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    csrf = page.text.split('"X-CSRF-Token": "', 1)[1].split('"', 1)[0]
    assert len(csrf) > 30
    return csrf


def test_the_page_logs_in_with_a_session_cookie_and_needs_its_csrf_token(console):
    with httpx.Client(base_url=console.url, timeout=60) as browser:
        wrong = browser.post("/login", data={"token": "not-the-token-0123456789"})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        csrf = login(browser)
        forged = browser.post("/ui/chat", data={"text": "hi"})  # what another site could send
        assert forged.status_code == 403
        wrong = browser.post("/ui/chat", data={"text": "hi"}, headers={"X-CSRF-Token": "x" * 43})
        assert wrong.status_code == 403
        r = browser.post("/ui/chat", data={"text": "hi <script>alert(1)</script>"},
                         headers={"X-CSRF-Token": csrf})
        assert r.status_code == 200 and 'class="msg clone"' in r.text
        assert "hi &lt;script&gt;alert(1)&lt;/script&gt;" in r.text and "<script>" not in r.text
        assert browser.get("/api/adapters").status_code == 200  # reading needs no CSRF token
        assert browser.post("/logout", headers={"X-CSRF-Token": csrf}).status_code == 200
        assert browser.get("/").status_code == 401


def test_an_error_on_the_page_is_a_notice(console):
    with httpx.Client(base_url=console.url, timeout=60) as browser:
        csrf = login(browser)
        r = browser.post("/ui/corrections", data={"reply_id": "gone", "rating": "good"},
                         headers={"X-CSRF-Token": csrf})
        assert r.status_code == 404 and r.headers["hx-retarget"] == "#notice" and 'class="error"' in r.text


def test_adapters_are_listed_and_switched_and_the_chat_follows(api, console):
    listed = api.get("/api/adapters").json()
    assert len(listed) == 2 and sum(a["active"] for a in listed) == 1
    other = next(a["version"] for a in listed if not a["active"])
    r = api.post(f"/api/adapters/{other}/activate")
    assert r.status_code == 200 and r.json()["active"] == other
    assert adapters.active_version(console.persona.adapters) == other
    assert console.serving == f"adapter {other}"  # the answering model followed at once
    assert [a["version"] for a in api.get("/api/adapters").json() if a["active"]] == [other]
    assert api.post("/api/chat", json={"text": "still there?"}).status_code == 200
    assert api.post("/api/adapters/..%2Fdataset/activate").status_code == 404
    assert api.post("/api/adapters/nope/activate").status_code == 404


def test_notes_are_listed_added_and_rewritten_then_reindexed(api, console):
    assert [n["name"] for n in api.get("/api/notes").json()] == ["bio.md"]
    done = api.post("/api/notes", json={"text": "My dog is called Biscuit."}).json()["done"]
    assert done.startswith("Saved note-") and console.reindexed
    assert api.post("/api/notes", json={"name": "bio.md", "text": "I am a nurse."}).status_code == 200
    assert (console.persona.knowledge / "bio.md").read_text() == "I am a nurse.\n"
    assert api.post("/api/notes", json={"name": "../persona.toml", "text": "x"}).status_code == 404
    assert len(api.get("/api/notes").json()) == 2


def test_a_retrain_runs_once_at_a_time_and_reports_progress(api):
    assert api.get("/api/retrain").json()["state"] in ("idle", "finished")
    started = api.post("/api/retrain")
    assert started.status_code == 202 and started.json()["state"] == "running"
    assert api.post("/api/retrain").status_code == 409
    status = started.json()
    for _ in range(200):
        status = api.get("/api/retrain").json()
        if status["state"] != "running":
            break
        time.sleep(0.05)
    assert status["state"] == "finished" and status["exit_code"] == 0
    assert status["progress"] == {"step": 3, "total": 3}
    assert status["lines"][-1] == "Active adapter: 20990101-000000"


# -- eval reports across versions (a console without a model, over fake adapter folders) --------

V1, V2, V3, V4 = "20260101-090000", "20260102-090000", "20260103-090000", "20260104-090000"


def fake_adapter(root: Path, version: str, steps: int) -> Path:
    """An adapter folder as the registry lists it: a manifest (no weights: nothing loads them here)."""
    folder = root / "adapters" / version
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({
        "version": version, "created": f"{version[:4]}-{version[4:6]}-{version[6:8]}T09:00:00+00:00",
        "persona": {"id": "sam"}, "prompt_contract": CONTRACT_VERSION, "base_model": {"id": "tiny"},
        "dataset": {"fingerprint": "f0"},
        "metrics": {"steps": steps, "val_perplexity": 50.0}}))
    return folder


def eval_result(version: str, adapter_ppl: float, knowledge: dict | None) -> dict:
    """An eval.json as training.evaluate builds one, with the person's words in its examples."""
    from training.report import verdict
    from training.style import compare_style

    replies = [f"haha {PLANTED} yes", "see you at 8!", "lol ok"]
    result = {
        "version": version,
        "perplexity": {"base": 80.1, "prompted": 60.2, "adapter": adapter_ppl,
                       "base_no_recall": 82.0, "adapter_no_recall": adapter_ppl + 1.5},
        "val_replies": 42, "val_tokens": 900, "dataset": "f0",
        "context_gain": {"adapter": 1.31, "base": 1.05},
        "knowledge": knowledge,
        "style": compare_style(["yes!", "ok see you"], replies),
        "examples": [{"context": f"Bo: free tonight? {PLANTED}", "real": replies[0], "generated": "yes",
                      "base": "As an AI"}],
        "model": {"base_model": "tiny", "train_steps": 120, "train_samples": 80,
                  "trained_on_dataset": "f0", "prompted_examples": 3},
    }
    result["verdict"] = verdict(result)
    return result


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    """A persona with four adapters: V1 evaluated (no knowledge quiz, loss plot only), V2 never
    evaluated, V3 evaluated with every plot and a quiz, V4 with a garbled eval.json and a plot
    that is a link out of its folder."""
    from training.report import write_report

    root = tmp_path_factory.mktemp("evals") / "sam"
    root.mkdir()
    (root / "persona.toml").write_text('name = "Sam"\nid = "sam"\n')
    losses = [{"loss": 3.0 - 0.1 * i, "step": i} for i in range(1, 9)] + [{"eval_loss": 2.5, "step": 8}]
    first = {k: v for k, v in eval_result(V1, 40.5, None).items() if k != "style"}  # no style plots
    write_report(first, fake_adapter(root, V1, 60) / "eval", losses)
    fake_adapter(root, V2, 90)
    quiz = {"asked": 4, "right": 2, "accuracy": 0.5, "questions": "questions.json",
            "answers": [{"question": "where do you live?", "reply": f"Lisbon {PLANTED}", "right": True}]}
    write_report(eval_result(V3, 30.3, quiz), fake_adapter(root, V3, 120) / "eval", losses)
    garbled = fake_adapter(root, V4, 150) / "eval"
    garbled.mkdir()
    (garbled / "eval.json").write_text('{"version": "2026010')  # a crash in the middle of a write
    (garbled / "loss.png").symlink_to(root / "persona.toml")
    return root


@pytest.fixture
def eval_console(evaluated, tmp_path) -> Iterator:
    console = console_without_model(copied(evaluated, tmp_path).root, [])
    port = free_port()
    with serving(console, port):
        console.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
        yield console


def section(page: str, start: str, end: str) -> str:
    """The part of the page from `start` to the next `end`."""
    assert start in page, start
    tail = page.split(start, 1)[1]
    return tail.split(end, 1)[0]


def test_the_eval_section_shows_the_active_adapters_report_with_its_plots(eval_console):
    root = eval_console.persona.adapters
    with httpx.Client(base_url=eval_console.url) as browser:  # V1 is not the newest evaluated
        csrf = login(browser)
        switched = browser.post(f"/ui/adapters/{V1}/activate", headers={"X-CSRF-Token": csrf}).text
        page = browser.get("/").text
    assert '<div id="evals" hx-swap-oob="true">' in switched  # the section follows at once
    assert section(switched, 'id="eval-report"', "</p>") == section(page, 'id="eval-report"', "</p>")
    report = section(page, 'id="eval-report"', "</div>")
    assert f"Report of adapter <strong>{V1}</strong> (active)" in report
    assert '<dd class="ppl-adapter">40.50</dd>' in report and '<dd class="ppl-base">80.10</dd>' in report
    assert "1.31" in report and '<dd class="knowledge">—</dd>' in report  # no quiz: no accuracy
    assert "perplexity 40.5 against 80.1" in report  # the report's verdict
    assert f'src="/api/evals/{V1}/plots/loss.png"' in report and "style_rates.png" not in report
    assert PLANTED not in page  # the report's examples are the person's words: never shown here

    adapters.activate(root, V2)  # never evaluated: the newest report there is, and what to run
    with httpx.Client(base_url=eval_console.url, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        report = section(api.get("/").text, 'id="eval-report"', "</div>")
    assert f"Report of adapter <strong>{V3}</strong>" in report and "(active)" not in report
    assert f"The active adapter {V2} is not evaluated: run <code>clone eval {V2}</code>" in report
    assert '<dd class="knowledge">50 %</dd>' in report
    for name in ("loss.png", "style_lengths.png", "style_rates.png"):
        assert f'src="/api/evals/{V3}/plots/{name}"' in report


def test_the_score_history_lists_every_version_and_charts_them(eval_console):
    with httpx.Client(base_url=eval_console.url, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        page = api.get("/")
        listed = api.get("/api/evals")
    assert page.status_code == 200
    table = section(page.text, '<table class="evals">', "</table>")
    rows = [row.split('"', 1)[0] for row in table.split('data-version="')[1:]]
    assert rows == [V3, V2, V1]  # newest first; V4's garbled report is left out
    assert f"not evaluated — run <code>clone eval {V2}</code>" in table
    assert "40.50" in table and "30.30" in table and "50 %" in table and "120" in table
    svg = section(page.text, '<svg class="eval-chart"', "</svg>")
    perplexity = section(svg, '<polyline class="series perplexity" points="', '"').split()
    knowledge = section(svg, '<polyline class="series knowledge" points="', '"').split()
    assert len(perplexity) == 2 and len(knowledge) == 1  # V1 had no quiz
    (x1, y1), (x3, y3) = (map(float, point.split(",")) for point in perplexity)
    assert x1 < x3 and y3 > y1  # oldest left; V3's lower perplexity drawn lower
    assert "<script" not in svg and "http" not in svg.replace("http://www.w3.org", "")

    assert listed.status_code == 200 and PLANTED not in listed.text
    scores = listed.json()
    assert [e["version"] for e in scores] == [V3, V1]
    assert scores[0]["perplexity"] == {"adapter": 30.3, "base": 80.1, "prompted": 60.2}
    assert scores[0]["knowledge_accuracy"] == 0.5 and scores[1]["knowledge_accuracy"] is None
    assert scores[0]["context_gain"] == {"adapter": 1.31, "base": 1.05} and scores[0]["steps"] == 120
    assert scores[0]["created"].startswith("2026-01-03") and scores[0]["verdict"].startswith("Your clone")
    assert scores[1]["plots"] == ["loss.png"]


def test_a_plot_is_served_only_from_its_report_and_only_to_the_owner(eval_console):
    with httpx.Client(base_url=eval_console.url, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        png = api.get(f"/api/evals/{V3}/plots/style_rates.png")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
        for path in (f"/api/evals/{V1}/plots/style_rates.png",  # not drawn for V1
                     f"/api/evals/{V1}/plots/eval.json",  # in the folder, but not a plot
                     f"/api/evals/{V1}/plots/..%2Fmanifest.json", f"/api/evals/{V1}/plots/..%2F..%2Factive",
                     "/api/evals/..%2F..%2Fpersona.toml/plots/loss.png", "/api/evals/active/plots/loss.png",
                     f"/api/evals/{V4}/plots/loss.png",  # a link out of the eval folder
                     f"/api/evals/{V2}/plots/loss.png", "/api/evals/nope/plots/loss.png"):
            r = api.get(path)
            assert r.status_code == 404 and "Sam" not in r.text and b"PNG" not in r.content, path
    with httpx.Client(base_url=eval_console.url) as anyone:
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}):
            r = anyone.get(f"/api/evals/{V3}/plots/loss.png", headers=headers)
            assert r.status_code == 401 and r.json() == {"error": "unauthorized"}
        csrf = login(anyone)  # the page's <img> comes with the session cookie
        assert csrf and anyone.get(f"/api/evals/{V1}/plots/loss.png").content.startswith(b"\x89PNG")


def test_without_any_report_the_page_says_what_to_run(tmp_path):
    (tmp_path / "persona.toml").write_text('name = "Sam"\n')
    fake_adapter(tmp_path, V1, 10)
    (tmp_path / "adapters" / V1 / "eval").mkdir()
    (tmp_path / "adapters" / V1 / "eval" / "eval.json").write_text('["not", "a", "report"]')
    console = console_without_model(tmp_path, [])
    port = free_port()
    with serving(console, port), httpx.Client(base_url=f"http://127.0.0.1:{port}",
                                               headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        page = api.get("/")
        listed = api.get("/api/evals")
    assert page.status_code == 200
    assert "No adapter evaluated yet: run <code>clone eval VERSION</code>" in page.text
    assert 'class="eval-chart"' not in page.text and '<table class="evals">' not in page.text
    assert listed.json() == []


# -- retrain progress as server-sent events ------------------------------------------------------


def events(client: httpx.Client, into: list, timeout: float = 60) -> None:
    """Read GET /api/retrain/events to its end: each status, and "heartbeat" for each comment."""
    with client.stream("GET", "/api/retrain/events", timeout=timeout) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                into.append(json.loads(line.removeprefix("data: ")))
            elif line.startswith(":"):
                into.append("heartbeat")


@contextlib.contextmanager
def retrain_console(tmp_path: Path, step_s: float) -> Iterator:
    """A console without a model whose retrain is FAKE_RETRAIN, each step taking `step_s`."""
    script = tmp_path / "fake_retrain.py"
    script.write_text(FAKE_RETRAIN)
    (tmp_path / "sam").mkdir()
    (tmp_path / "sam" / "persona.toml").write_text('name = "Sam"\n')
    console = console_without_model(tmp_path / "sam", [sys.executable, str(script), "0", str(step_s)])
    port = free_port()
    with serving(console, port), httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                               headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        yield console, api


def test_retrain_events_follow_a_run_with_heartbeats_and_end_with_it(tmp_path, monkeypatch):
    import bot.console

    monkeypatch.setattr(bot.console, "HEARTBEAT_S", 0.2)  # the steps below last longer than this
    with retrain_console(tmp_path, 0.8) as (_, api):
        got: list = []
        events(api, got)  # nothing runs: the status, and the stream ends
        assert [e["state"] for e in got] == ["idle"]
        assert api.post("/api/retrain").status_code == 202
        got.clear()
        events(api, got)
    statuses = [e for e in got if e != "heartbeat"]
    assert "heartbeat" in got
    assert statuses[0]["state"] == "running" and statuses[-1]["state"] == "finished"
    assert all(e["state"] == "running" for e in statuses[:-1])  # nothing after the final status
    steps = [e["progress"]["step"] for e in statuses[:-1] if e["progress"]]
    assert len(set(steps)) >= 2 and steps == sorted(steps)  # the bar's steps arrived as they came
    assert statuses[-1]["exit_code"] == 0
    assert statuses[-1]["progress"] == {"step": 3, "total": 3}
    assert statuses[-1]["lines"][-1] == "Active adapter: 20990101-000000"
    assert all(a != b for a, b in itertools.pairwise(statuses))  # only changes are sent


def test_the_server_stops_at_once_with_an_event_stream_open(tmp_path):
    got: list = []
    ended: list = []

    def follow(url: str) -> None:  # a page that keeps the stream open, on its own connection
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as page:
            events(page, got)
        ended.append(True)

    with retrain_console(tmp_path, 60) as (console, api):  # a run of three minutes
        assert api.post("/api/retrain").status_code == 202
        reader = threading.Thread(target=follow, args=(str(api.base_url),), daemon=True)
        reader.start()
        for _ in range(100):
            if got:
                break
            time.sleep(0.05)
        assert got and got[0]["state"] == "running"
        began = time.monotonic()
    stopped = time.monotonic() - began  # Ctrl-C: the server, and the retrain it started, are gone
    reader.join(10)
    assert stopped < 10, f"the open stream held the shutdown for {stopped:.0f} s"
    assert ended == [True]  # the stream was ended cleanly, not cut
    assert not console.retrain.running and console.retrain.exit_code != 0


def test_message_text_and_corrections_are_never_logged(api, console, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    said = api.post("/api/chat", json={"text": f"hello {PLANTED}"}).json()
    api.post("/api/corrections", json={"reply_id": said["id"], "text": f"no {PLANTED}"})
    api.post("/api/corrections", json={"reply_id": said["id"], "text": ""})  # refused: still silent
    assert caplog.records  # the engine did log its line
    for r in caplog.records:
        assert PLANTED not in r.getMessage() and PLANTED not in repr(r.args)
        assert TOKEN not in r.getMessage()
    out, err = capfd.readouterr()
    assert PLANTED not in out + err and TOKEN not in out + err


def test_a_short_console_token_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    from cli.main import main

    monkeypatch.setenv("CLONE_CONSOLE_TOKEN", "short")
    monkeypatch.chdir(tmp_path)
    assert main(["console", "--persona", str(REPO / "persona_data" / "sample")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clone console: error: CLONE_CONSOLE_TOKEN must be 16") and "short" not in err
    assert len(err.splitlines()) == 1


# -- a real browser: headless Chromium (Debian's) against `clone console` ------------------------


def chromium():
    """Debian's chromium through its chromedriver; a missing one fails the test, never skips it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "the browser test needs Debian's chromium and chromium-driver " \
                              "(apt-get install chromium chromium-driver; .ci/run installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900",
                 "--force-prefers-reduced-motion"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@contextlib.contextmanager
def console_process(persona: Persona, base: Path, port: int, tmp_path: Path) -> Iterator[tuple]:
    """`clone console` as the owner starts it (no CLONE_CONSOLE_TOKEN: it makes one); yields the
    process and its stdout lines so far (a list that keeps filling)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "CLONE_CONSOLE_TOKEN"}
    env.update(CLONE_RECALL="false", CLONE_MEMORY_FILE=str(tmp_path / "memory.json"), PYTHONUNBUFFERED="1")
    err = (tmp_path / "console.err").open("w")
    # Ctrl-C reaches it as it would from a terminal, however the suite was started: a shell's
    # background job (`pytest &`, nohup) passes SIGINT down ignored, and the console never stopped.
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "console", "--persona", str(persona.root), "--base", str(base),
         "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        yield proc, lines
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.wait(30)
        err.close()


def printed_token(proc, lines: list[str], timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [line for line in lines if line.startswith("Token ")]
        if found:
            return found[0].rsplit(": ", 1)[1].strip()
        assert proc.poll() is None, f"clone console ended ({proc.returncode}): {lines}"
        time.sleep(0.1)
    raise AssertionError(f"clone console printed no token: {lines}")


def active_row_version(browser) -> str | None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:  # htmx may be swapping the table in
        return browser.find_element(By.CSS_SELECTOR, "table.adapters tr.active").get_attribute("data-version")
    except (NoSuchElementException, StaleElementReferenceException):
        return None


def drive(browser, url: str, token: str, message: str, correction: str, shot: Path) -> None:
    """Log in, chat, correct the reply, see it listed, rate it, switch adapters: what an owner does."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    # A panel the page re-renders between finding an element and reading it is read again next poll.
    wait = WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,))
    browser.get(url)
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.ID, "login").click()
    box = wait.until(seen.element_to_be_clickable((By.ID, "chat-text")))
    evals = browser.find_element(By.ID, "eval")  # no adapter of this persona was evaluated
    assert evals.is_displayed() and "No adapter evaluated yet" in evals.text
    box.send_keys(message)
    browser.find_element(By.ID, "send").click()
    reply = wait.until(seen.presence_of_element_located((By.CSS_SELECTOR, ".msg.clone")))
    wait.until(lambda b: box.get_attribute("value") == "")  # console.js empties the box
    reply.find_element(By.CSS_SELECTOR, ".rewrite textarea").send_keys(correction)
    reply.find_element(By.CSS_SELECTOR, ".rewrite button").click()
    wait.until(seen.text_to_be_present_in_element((By.ID, "corrections"), correction))
    wait.until(seen.text_to_be_present_in_element((By.CSS_SELECTOR, ".feedback .saved"), "Saved"))
    browser.find_element(By.CSS_SELECTOR, ".feedback .rate button.good").click()
    wait.until(seen.text_to_be_present_in_element((By.ID, "corrections"), "rated it good"))
    row = browser.find_element(By.CSS_SELECTOR, "table.adapters tbody tr:not(.active)")
    version = row.get_attribute("data-version")
    row.find_element(By.TAG_NAME, "button").click()
    # Exact text: two adapters trained in one second are "v" and "v-2", and one contains the other.
    wait.until(lambda b: b.find_element(By.ID, "serving").text.strip() == f"adapter {version}")
    wait.until(lambda b: active_row_version(b) == version)
    browser.find_element(By.ID, "chat-text").send_keys("and now?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.clone")) == 2)
    browser.save_screenshot(str(shot))


def test_a_real_browser_logs_in_chats_corrects_and_switches_adapters(trained, tiny_base, tmp_path):
    persona = copied(trained, tmp_path)
    before = adapters.active_version(persona.adapters)
    port = free_port()
    with console_process(persona, tiny_base, port, tmp_path) as (proc, lines):
        token = printed_token(proc, lines)
        browser = chromium()
        try:
            drive(browser, f"http://127.0.0.1:{port}/", token, f"are you coming tonight? {PLANTED}",
                  "yes!! see you at 8", tmp_path / "console.png")
        finally:
            browser.quit()
    assert proc.returncode == 0  # Ctrl-C is the normal way to stop it
    stored = corrections.load(corrections.corrections_file(persona.root))
    assert [c.get("text") or c.get("rating") for c in stored] == ["yes!! see you at 8", "good"]
    assert stored[0]["context"][-1]["content"] == f"are you coming tonight? {PLANTED}"
    assert adapters.active_version(persona.adapters) not in (None, before)
    printed = "".join(lines)
    assert printed.count(token) == 1  # shown once, at start
    logged = (tmp_path / "console.err").read_text()
    assert PLANTED not in printed + logged and token not in logged
    assert (tmp_path / "console.png").stat().st_size > 10_000
    if os.environ.get("CONSOLE_SCREENSHOT"):  # the README's picture is taken on purpose, not by every run
        shutil.copyfile(tmp_path / "console.png", os.environ["CONSOLE_SCREENSHOT"])


def test_a_real_browser_follows_a_retrain_as_the_server_pushes_it(tmp_path):
    """The panel has no polling of its own: only console.js, on the pushed events, updates it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    with retrain_console(tmp_path, 2.0) as (_, api):  # three steps of two seconds
        browser = chromium()
        try:
            wait = WebDriverWait(browser, 60, poll_frequency=0.1)
            browser.get(f"{api.base_url}/")
            browser.find_element(By.ID, "token").send_keys(TOKEN)
            browser.find_element(By.ID, "login").click()
            wait.until(seen.element_to_be_clickable((By.CSS_SELECTOR, "#retrain button"))).click()
            wait.until(seen.text_to_be_present_in_element((By.ID, "retrain"), "step 1 of 3"))
            wait.until(seen.text_to_be_present_in_element((By.ID, "retrain"), "step 2 of 3"))
            wait.until(seen.text_to_be_present_in_element((By.ID, "retrain-state"), "finished"))
            assert "Active adapter: 20990101-000000" in browser.find_element(By.ID, "retrain").text
            assert browser.execute_script("return retrainPolling") is False  # the stream never failed
        finally:
            browser.quit()
