"""Format detection, folder walking and the `clone import` / `clone prepare` commands, in-process."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from cli.main import main
from training.importers import detect_format, find_sources, import_messages
from training.message import FIELDS, ExportError, ImportReport

from .conftest import FIXTURES

DETECTED = {
    "telegram/single_chat.json": "telegram",
    "telegram/full_export.json": "telegram",
    "whatsapp/ios_chat.txt": "whatsapp",
    "whatsapp/WhatsApp Chat with Bob Smith.txt": "whatsapp",
    "whatsapp/year_first.txt": "whatsapp",
    "discord/guild_channel.json": "discord-json",
    "discord/Cool Server - general [222222222222222222].csv": "discord-csv",
    "discord/package": "discord-package",
    "tables/faq.csv": "qa-csv",
    "tables/transcript.csv": "speaker-csv",
}


@pytest.mark.parametrize(("name", "fmt"), sorted(DETECTED.items()))
def test_format_is_detected_from_content(name, fmt, tmp_path):
    src = FIXTURES / name
    # Detection must not lean on the file name: copy under a neutral one.
    if src.is_file():
        neutral = tmp_path / "export.dat"
        shutil.copy(src, neutral)
        src = neutral
    assert detect_format(src) == fmt


def test_whatsapp_zip_is_detected(tmp_path):
    z = tmp_path / "WhatsApp Chat - Bob.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.write(FIXTURES / "whatsapp/ios_chat.txt", "_chat.txt")
        f.writestr("00000001-PHOTO.jpg", b"\xff\xd8")
    assert detect_format(z) == "whatsapp"
    assert list(import_messages([z], ImportReport()))


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"\x00\x01\x02\xff\xfe binary", "binary"),
        (b"just some notes\nnothing like a chat\n", "unknown format"),
        (b'{"foo": [1, 2, 3]}', "not a chat export"),
        ("caf\xe9 au lait".encode("latin-1"), "not UTF-8"),
    ],
)
def test_unreadable_files_get_one_clear_error(tmp_path, content, reason):
    bad = tmp_path / "thing.txt"
    bad.write_bytes(content)
    with pytest.raises(ExportError) as e:
        detect_format(bad)
    assert str(bad) in str(e.value) and reason in str(e.value)


def test_folder_walk_passes_over_media_and_finds_packages(tmp_path):
    root = tmp_path / "exports"
    (root / "tg" / "photos").mkdir(parents=True)
    shutil.copy(FIXTURES / "telegram/single_chat.json", root / "tg" / "result.json")
    (root / "tg" / "photos" / "photo_1.jpg").write_bytes(b"\xff\xd8\xff")
    (root / "tg" / "messages.html").write_text("<html></html>")
    (root / "notes.txt").write_text("shopping list: eggs\n")
    shutil.copytree(FIXTURES / "discord/package", root / "discord_package")
    report = ImportReport()
    sources = find_sources([root], report)
    assert [(p.relative_to(root).as_posix(), f) for p, f in sources] == [
        ("discord_package", "discord-package"),
        ("tg/result.json", "telegram"),
    ]
    assert report.skipped["file that is not a chat export"] == 3


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_import_writes_normalized_lines_and_a_summary(tmp_path, capsys):
    out_file = tmp_path / "messages.jsonl"
    code, out, _ = run(
        ["import", FIXTURES / "telegram/full_export.json", FIXTURES / "whatsapp/ios_chat.txt",
         FIXTURES / "discord/guild_channel.json", "--out", out_file],
        capsys,
    )
    assert code == 0
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert rows and all(tuple(r) == FIELDS for r in rows)
    assert {r["platform"] for r in rows} == {"telegram", "whatsapp", "discord"}
    assert "owner of the export" in out
    assert "Skipped:" in out and "Authors by message count" in out
    # The normalized file reads back as an input, unchanged.
    again = tmp_path / "again.jsonl"
    assert run(["import", out_file, "--out", again], capsys)[0] == 0
    assert again.read_text() == out_file.read_text()


def test_a_malformed_file_stops_the_import_and_writes_nothing(tmp_path, capsys):
    good = FIXTURES / "telegram/single_chat.json"
    truncated = tmp_path / "result.json"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    out_file = tmp_path / "messages.jsonl"
    code, _, err = run(["import", good, truncated, "--out", out_file], capsys)
    assert code == 2
    [line] = err.strip().splitlines()
    assert str(truncated) in line and "byte" in line
    assert not out_file.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temp files left behind


def new_persona(tmp_path, capsys, *exports, me=(), name="Alice") -> Path:
    """A persona folder made the way a user makes one: `clone init` with their exports."""
    folder = tmp_path / name.lower()
    argv = ["init", folder, "--name", name, *(x for m in me for x in ("--me", m))]
    code, out, _ = run([*argv, "--exports", *exports] if exports else argv, capsys)
    assert code == 0 and f"Created persona {name}" in out
    return folder


def test_prepare_mixed_sources_end_to_end(tmp_path, capsys):
    persona = new_persona(tmp_path, capsys, FIXTURES / "whatsapp/WhatsApp Chat with Bob Smith.txt",
                          FIXTURES / "tables/faq.csv", me=["Alice", "me"])
    code, out, _ = run(["prepare", "--persona", persona, "--val-fraction", "0"], capsys)
    assert code == 0, out
    out_dir = persona / "dataset"
    card = json.loads((out_dir / "card.json").read_text())
    train = [json.loads(x) for x in (out_dir / "train.jsonl").read_text().splitlines()]
    assert card["samples"]["train"] == len(train) > 0
    assert {s["format"] for s in card["sources"]} == {"whatsapp", "qa-csv"}
    for s in train:
        assert s["messages"][0]["role"] == "system"
        assert s["messages"][-1]["role"] == "assistant"
    assert "Dataset for Alice" in out
    assert f"Persona Alice [alice] in {persona}" in out  # which persona and dataset, in one line


def test_prepare_without_me_names_the_authors(tmp_path, capsys):
    persona = new_persona(tmp_path, capsys, FIXTURES / "whatsapp/day_first_24h.txt")
    code, out, err = run(["prepare", "--persona", persona], capsys)
    assert code == 2 and "--me" in err and "`me` in persona.toml" in err
    assert "Authors by message count" in out
    assert not (persona / "dataset").exists()


def test_prepare_takes_the_author_named_as_the_persona(tmp_path, capsys):
    chat = FIXTURES / "whatsapp/WhatsApp Chat with Bob Smith.txt"
    persona = new_persona(tmp_path, capsys, chat, name="alice")  # Alice writes in it, Bob Smith too
    code, out, _ = run(["prepare", "--persona", persona, "--val-fraction", "0"], capsys)
    assert code == 0, out
    assert "Taking the author named alice as alice" in out
    train = [json.loads(x) for x in (persona / "dataset" / "train.jsonl").read_text().splitlines()]
    replies = [m["content"] for s in train for m in s["messages"] if m["role"] == "assistant"]
    assert replies and all(r.startswith("Same to you") for r in replies)  # Alice's words, not Bob's
    nobody = new_persona(tmp_path / "other", capsys, chat, name="Carol")  # no author of that name
    code, _, err = run(["prepare", "--persona", nobody], capsys)
    assert code == 2 and "`me` in persona.toml" in err


def test_a_knowledge_table_beside_a_chat_leaves_the_person_the_author_named_as_the_persona(tmp_path, capsys):
    chat = FIXTURES / "whatsapp/WhatsApp Chat with Bob Smith.txt"
    persona = new_persona(tmp_path, capsys, chat, FIXTURES / "tables/faq.csv", name="alice")
    code, out, _ = run(["prepare", "--persona", persona, "--val-fraction", "0"], capsys)
    assert code == 0, out
    assert "Taking the author named alice as alice" in out  # not the table's answerer
    train = [json.loads(x) for x in (persona / "dataset" / "train.jsonl").read_text().splitlines()]
    replies = [m["content"] for s in train for m in s["messages"] if m["role"] == "assistant"]
    assert any(r.startswith("Same to you") for r in replies)  # Alice's chat replies are trained on
    table_only = new_persona(tmp_path / "other", capsys, FIXTURES / "tables/faq.csv", name="Carol")
    code, out, _ = run(["prepare", "--persona", table_only, "--val-fraction", "0"], capsys)
    assert code == 0 and "Taking the export's owner as" in out  # a table alone: its answerer


def test_prepare_uses_the_exports_owner(tmp_path, capsys):
    persona = new_persona(tmp_path, capsys, FIXTURES / "telegram/full_export.json")
    code, out, _ = run(["prepare", "--persona", persona], capsys)
    assert code == 0, out
    assert "Taking the export's owner as" in out


def test_start_prepares_and_trains_the_sample_persona(tmp_path, capsys, tiny_base):
    persona = tmp_path / "sample"
    shutil.copytree(Path(__file__).parent.parent / "persona_data" / "sample", persona)
    argv = ["start", "--persona", persona, "--base", tiny_base, "--max-steps", "2", "--no-chat"]
    code, out, _ = run(argv, capsys)
    assert code == 0, out
    card = json.loads((persona / "dataset" / "card.json").read_text())
    assert card["persona"] == "Sam Rivera"
    assert card["samples"]["train"] > 100 and card["samples"]["val"] > 5
    assert card["conversations"]["train"] + card["conversations"]["val"] >= 90
    assert "No adapter yet: training one" in out
    [adapter] = (persona / "adapters").glob("2*")
    assert (persona / "adapters" / "active").resolve() == adapter.resolve()
    # A second start finds the adapter and does not train again.
    code, out, _ = run(argv, capsys)
    assert code == 0 and f"Active adapter: {adapter.name}" in out


def test_prepare_with_no_sample_fails_and_keeps_the_old_dataset(tmp_path, capsys):
    persona = new_persona(tmp_path, capsys, FIXTURES / "whatsapp/WhatsApp Chat with Bob Smith.txt",
                          me=["Alice"])
    assert run(["prepare", "--persona", persona], capsys)[0] == 0
    dataset = persona / "dataset"
    before = {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()}
    # New exports in which Alice only ever sends photos: she is there, but no text of hers is kept.
    shutil.rmtree(persona / "exports")
    (persona / "exports").mkdir()
    (persona / "exports" / "WhatsApp Chat with Bob Smith.txt").write_text(
        "".join(f"3/{d}/22, 9:0{k} AM - {line}\n" for d in range(1, 9)
                for k, line in enumerate([f"Bob Smith: photo {d}?", "Alice: <Media omitted>"])))
    code, _, err = run(["prepare", "--persona", persona], capsys)
    assert code == 2
    [line] = err.strip().splitlines()
    assert line.startswith("clone prepare: error: ") and "no training sample" in line
    assert str(dataset) in line and "unchanged" in line
    assert {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()} == before  # byte for byte
    assert sorted(p.name for p in persona.iterdir()) == ["dataset", "exports", "persona.toml"]
