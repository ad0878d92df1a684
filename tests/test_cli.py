"""The `clone` command as a new user meets it: one persona, one folder, from `clone init` to
`clone retrain`, with two personas side by side and the sample left untouched."""

from __future__ import annotations

import hashlib
import io
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cli.main import build_parser, main
from training import adapters

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "persona_data" / "sample"


def run(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def whatsapp_export(path: Path, me: str, other: str, days: int, topic: str = "plans") -> Path:
    lines = [
        f"3/{day}/22, 9:0{k} AM - {who}: {text}\n"
        for day in range(1, days + 1)
        for k, (who, text) in enumerate([(other, f"{topic} for day {day}?"), (me, "beach!!\nyou in?")])
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def telegram_export(path: Path, me: str, me_id: int, other: str, days: int, start: int = 0) -> Path:
    messages, n = [], 0
    t0 = datetime(2024, 5, 1, tzinfo=UTC)
    for day in range(start, start + days):
        for k, (who, uid, text) in enumerate([(other, 42, f"how was day {day}?"),
                                              (me, me_id, f"pretty good, day {day} was fun")]):
            n += 1
            at = t0 + timedelta(days=day, minutes=k)
            messages.append({"id": n, "type": "message", "date": at.strftime("%Y-%m-%dT%H:%M:%S"),
                             "date_unixtime": str(int(at.timestamp())), "from": who,
                             "from_id": f"user{uid}", "text": text})
    chat = {"name": other, "type": "personal_chat", "id": 42, "messages": messages}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chat), encoding="utf-8")
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def personas(tmp_path, monkeypatch) -> Path:
    """An empty persona_data/ of the test's own; commands run from another empty folder."""
    root = tmp_path / "persona_data"
    root.mkdir()
    monkeypatch.setenv("CLONE_PERSONAS", str(root))
    monkeypatch.delenv("CLONE_PERSONA", raising=False)
    monkeypatch.delenv("CLONE_MEMORY_FILE", raising=False)  # memory goes to each persona's folder
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("LLM_BASE_URL", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return root


def test_a_new_user_path_with_two_personas_side_by_side(personas, tmp_path, tiny_base, capsys, monkeypatch):
    sample_before = snapshot(SAMPLE)
    downloads = tmp_path / "downloads"
    wa = whatsapp_export(downloads / "WhatsApp Chat with Dana.txt", "Alice", "Dana", days=12)
    tg = telegram_export(downloads / "tg1" / "result.json", "Bob Jones", 7, "Carol", days=12)
    assert run(["init", "alice", "--name", "Alice", "--me", "Alice", "--exports", wa], capsys)[0] == 0
    assert run(["init", "bob", "--name", "Bob Jones", "--me", "Bob Jones", "--exports", tg], capsys)[0] == 0

    # Two personas of one's own: no command guesses which one.
    code, _, err = run(["prepare"], capsys)
    assert code == 2 and "several personas" in err and "alice, bob" in err
    tiny = ["--base", tiny_base]
    for name in ("alice", "bob"):
        code, out, _ = run(["prepare", "--persona", name], capsys)
        assert code == 0, out
        code, out, _ = run(["train", "--persona", name, *tiny, "--max-steps", "4"], capsys)
        assert code == 0, out
        # Which persona and which dataset, said before training.
        assert f"[{name}] in {personas / name}" in out and f"dataset {personas / name / 'dataset'}" in out
        [manifest] = adapters.versions(personas / name / "adapters")
        assert manifest["persona"]["id"] == name
    assert not (Path.cwd() / "adapters").exists() and not list(Path.cwd().iterdir())  # nothing lands here

    code, out, _ = run(["eval", "--persona", "alice", *tiny, "--json", "--samples", "2"], capsys)
    assert code == 0 and json.loads(out)["perplexity"]["adapter"] > 0
    code, out, err = run(["chat", "--persona", "alice", *tiny], capsys, "hi alice\n/quit\n", monkeypatch)
    assert code == 0, err
    assert "Chatting with Alice (adapter " in out
    assert "hi alice" in (personas / "alice" / "memory.json").read_text()  # the persona's own memory
    assert not (personas / "bob" / "memory.json").exists()

    # Telegram names every export result.json: a retrain with a second one keeps both.
    tg2 = telegram_export(downloads / "tg2" / "result.json", "Bob Jones", 7, "Carol", days=6, start=20)
    code, out, _ = run(["retrain", tg2, "--persona", "bob", *tiny, "--max-steps", "2"], capsys)
    assert code == 0, out
    added = sorted(p.relative_to(personas / "bob" / "exports").parts[1:]
                   for p in (personas / "bob" / "exports").glob("added-*/*/result.json"))
    assert added == [("01", "result.json")]
    card = json.loads((personas / "bob" / "dataset" / "card.json").read_text())
    assert [s["file"] for s in card["sources"]] == ["result.json", "result.json"]
    assert len(adapters.versions(personas / "bob" / "adapters")) == 2
    assert len(adapters.versions(personas / "alice" / "adapters")) == 1
    assert snapshot(SAMPLE) == sample_before


def test_an_adapter_of_another_persona_is_refused(personas, tmp_path, tiny_base, capsys, monkeypatch):
    import shutil

    wa = whatsapp_export(tmp_path / "wa.txt", "Alice", "Dana", days=10)
    for name in ("alice", "bob"):
        assert run(["init", name, "--me", "Alice", "--exports", wa], capsys)[0] == 0
    assert run(["prepare", "--persona", "alice"], capsys)[0] == 0
    train = ["train", "--persona", "alice", "--base", tiny_base, "--max-steps", "2", "--lora-top-layers"]
    code, _, err = run([*train, "16"], capsys)  # a layer count where a share is asked for
    assert code == 2 and "lora_top_layers is a share of the layers" in err
    assert len(err.strip().splitlines()) == 1
    registry = personas / "alice" / "adapters"
    assert not registry.exists() or not any(registry.iterdir())  # no run folder left behind
    assert run([*train, "1", "--no-lora-head"], capsys)[0] == 0
    version = adapters.active_version(personas / "alice" / "adapters")
    manifest = json.loads((personas / "alice" / "adapters" / version / "manifest.json").read_text())
    assert manifest["hyperparameters"]["lora_top_layers"] == 1.0  # the flags reach the run
    assert manifest["hyperparameters"]["lora_head"] is False
    shutil.copytree(personas / "alice" / "adapters", personas / "bob" / "adapters", symlinks=True)
    code, _, err = run(["chat", "--persona", "bob", "--base", tiny_base], capsys, "hi\n", monkeypatch)
    assert code == 2
    assert "trained for persona 'alice', not 'bob'" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["adapters", "use", version, "--persona", "bob"], capsys)
    assert code == 2 and "trained for persona 'alice'" in err


def test_the_default_persona_is_explicit(personas, tmp_path, capsys, monkeypatch):
    # None of one's own: the sample, with a notice.
    code, out, err = run(["adapters"], capsys)
    assert code == 0 and "using the sample persona" in err and "[sample]" in out
    assert "using the sample persona" not in out  # stdout stays the command's own (a --json object)
    # Exactly one of one's own: that one, without being asked.
    assert run(["init", "me", "--name", "Alex"], capsys)[0] == 0
    code, out, _ = run(["adapters"], capsys)
    assert code == 0 and "Persona Alex [me]" in out and "sample" not in out
    # CLONE_PERSONA picks one by name or folder, from the environment or a .env file.
    assert run(["init", "other", "--name", "Other"], capsys)[0] == 0
    (Path.cwd() / ".env").write_text("CLONE_PERSONA=other  # the one I work on\n")
    code, out, _ = run(["adapters"], capsys)
    assert code == 0 and "Persona Other [other]" in out
    monkeypatch.setenv("CLONE_PERSONA", str(personas / "me"))  # the environment beats .env
    assert "Persona Alex [me]" in run(["adapters"], capsys)[1]
    code, _, err = run(["adapters", "--persona", "nobody"], capsys)
    assert code == 2 and "no persona 'nobody'" in err and "me, other" in err


def test_private_exports_never_land_in_the_sample(personas, tmp_path, capsys):
    before = snapshot(SAMPLE)
    private = whatsapp_export(tmp_path / "my.txt", "Me", "Friend", days=3)
    code, _, err = run(["retrain", private], capsys)  # no persona of one's own: the sample
    assert code == 2 and "sample persona, which git tracks" in err and "clone init" in err
    code, _, err = run(["retrain", private, "--persona", SAMPLE], capsys)
    assert code == 2 and "sample persona" in err
    assert snapshot(SAMPLE) == before


def test_a_failed_retrain_keeps_exports_dataset_and_adapter(personas, tmp_path, tiny_base, capsys):
    wa = whatsapp_export(tmp_path / "wa.txt", "Alice", "Dana", days=10)
    assert run(["init", "alice", "--me", "Alice", "--exports", wa], capsys)[0] == 0
    assert run(["prepare", "--persona", "alice"], capsys)[0] == 0
    assert run(["train", "--persona", "alice", "--base", tiny_base, "--max-steps", "2"], capsys)[0] == 0
    folder = personas / "alice"
    before = snapshot(folder)
    broken = tmp_path / "dl" / "result.json"
    broken.parent.mkdir()
    broken.write_text('{"name": "x", "type": "personal_chat", "messages": [{"id": 1, "ty')
    code, _, err = run(["retrain", broken, "--persona", "alice", "--base", tiny_base], capsys)
    assert code == 2 and str(broken.name) in err
    assert snapshot(folder) == before  # no copied export, dataset or adapter left behind
    # Two folders of the same name: both kept, no traceback.
    same = [whatsapp_export(tmp_path / d / "chat" / "WhatsApp Chat.txt", "Alice", f"F{d}", days=4)
            for d in ("a", "b")]
    code, _, err = run(["retrain", same[0].parent, same[1].parent, "--persona", "alice",
                          "--base", tiny_base, "--max-steps", "1"], capsys)
    assert code == 0, err
    assert len(list((folder / "exports").glob("added-*/*/chat/WhatsApp Chat.txt"))) == 2


def test_the_adapters_table_says_what_is_comparable(personas, tmp_path, tiny_base, capsys):
    wa = whatsapp_export(tmp_path / "wa.txt", "Alice", "Dana", days=12)
    assert run(["init", "alice", "--me", "Alice", "--exports", wa], capsys)[0] == 0
    train = ["train", "--persona", "alice", "--base", tiny_base, "--max-steps", "1"]
    assert run(["prepare", "--persona", "alice", "--val-fraction", "0.3"], capsys)[0] == 0
    assert run(train, capsys)[0] == 0
    first = adapters.active_version(personas / "alice" / "adapters")
    assert run(["prepare", "--persona", "alice", "--val-fraction", "0.5"], capsys)[0] == 0  # other data
    assert run(train, capsys)[0] == 0
    code, out, _ = run(["adapters", "--persona", "alice"], capsys)
    header = next(line for line in out.splitlines() if "version" in line)
    assert all(col in header for col in ("created", "persona", "dataset", "val ppl"))
    rows = {line.split()[0].lstrip("*"): line for line in out.splitlines() if line[2:4] == "20"}
    assert "†" in rows.get(first, next(r for r in rows.values() if first in r))
    assert "another dataset than the current one" in out
    code, _, err = run(["adapters", "use", "nope", "--persona", "alice"], capsys)
    assert code == 2 and "no adapter 'nope'" in err and first in err  # the known ones are listed


def test_help_shows_every_option_with_help_and_defaults(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"clone {name} {action.option_strings or action.dest} has no help"
        outs = [a for a in sub._actions if "--out" in a.option_strings]
        assert name == "import" or not outs, f"clone {name} still has --out"
    assert "(default: 3.0)" in commands["train"].format_help()
    assert "(default: 4.0)" in commands["start"].format_help()  # start's own time budget
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("clone ")


def test_import_without_out_writes_nothing_here(personas, capsys):
    from tests.conftest import FIXTURES

    code, out, _ = run(["import", FIXTURES / "telegram" / "full_export.json"], capsys)
    assert code == 0 and "Authors by message count" in out
    assert list(Path.cwd().iterdir()) == []


def test_license_matches_the_package_metadata():
    import tomllib

    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Permission is hereby granted" in text
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}


def test_a_dot_slash_folder_is_that_folder_not_a_name(personas, capsys):
    # pathlib reads "./jo" as "jo": init and --persona must still take it as the folder here.
    code, out, _ = run(["init", "./jo", "--name", "Jo"], capsys)
    assert code == 0 and (Path.cwd() / "jo" / "persona.toml").is_file()
    assert not (personas / "jo").exists() and "--persona ./jo" in out
    code, out, _ = run(["adapters", "--persona", "./jo"], capsys)
    assert code == 0 and "Persona Jo [jo]" in out
    code, _, err = run(["adapters", "--persona", "./nobody"], capsys)
    assert code != 0 and "nobody" in err
