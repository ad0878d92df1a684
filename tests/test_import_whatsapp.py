"""WhatsApp importer: every header variant, the invisible marks, day/month inference, zips,
stable ids, and the malformed inputs that must fail with the file's name."""

from __future__ import annotations

import shutil
import zipfile
from datetime import datetime
from pathlib import Path

import pytest

from training.importers.whatsapp import read_whatsapp, sniff_whatsapp
from training.message import ExportError, ImportReport, Message

FIX = Path(__file__).parent / "fixtures" / "whatsapp"
ENC = (
    "Messages and calls are end-to-end encrypted. No one outside of this chat, not even "
    "WhatsApp, can read or listen to them."
)
D = datetime


def read(path: Path) -> tuple[list[Message], ImportReport]:
    report = ImportReport()
    return list(read_whatsapp(path, report)), report


def rows(msgs: list[Message]) -> list[tuple]:
    return [(m.timestamp, m.kind, m.author, m.text) for m in msgs]


def test_android_us_12h_with_narrow_nbsp_before_pm() -> None:
    msgs, report = read(FIX / "WhatsApp Chat with Bob Smith.txt")
    assert rows(msgs) == [
        (D(2021, 12, 31, 22, 1), "service", None, ENC + " Tap to learn more."),
        (D(2021, 12, 31, 22, 1), "text", "Bob Smith", "Happy new year!"),
        (D(2021, 12, 31, 22, 2), "text", "Alice", "Same to you\nsee you tomorrow"),
        (D(2021, 12, 31, 23, 59), "media", "Bob Smith", ""),
        (D(2022, 1, 1, 0, 0), "text", "Alice", "midnight!"),  # 12:00 AM is midnight
        (D(2022, 1, 1, 12, 30), "text", "Bob Smith", "lunch?"),  # 12:30 PM is noon
    ]
    assert report.notes == [] and not report.skipped
    m = msgs[1]
    assert (m.platform, m.chat_id, m.chat_name) == ("whatsapp", "wa:Bob Smith", "Bob Smith")
    assert (m.author_id, m.reply_to) == ("Bob Smith", None)
    assert msgs[0].author_id is None
    assert all(m.timestamp.tzinfo is None for m in msgs)  # local time, no zone


def test_day_first_24h_multiline_and_bad_timestamp() -> None:
    msgs, report = read(FIX / "day_first_24h.txt")
    assert rows(msgs) == [
        (D(2021, 12, 31, 22, 1), "text", "Ana", "Hola"),
        (
            D(2022, 1, 5, 9, 15),
            "text",
            "Ben",
            "Morning\nsecond line\n\nfourth line after a blank one",
        ),
        # 31/02/2022 is skipped together with its continuation line
        (D(2022, 1, 6, 23, 59), "text", "Ana", "last"),
    ]
    assert report.skipped == {"bad timestamp": 1}
    assert report.notes == []
    assert msgs[0].chat_id == "wa:day_first_24h"


def test_ios_bracketed_with_seconds_and_marks() -> None:
    msgs, report = read(FIX / "ios_chat.txt")
    assert rows(msgs) == [
        (D(2021, 12, 31, 22, 1, 5), "service", None, ENC),
        (D(2021, 12, 31, 22, 1, 5), "service", None, "Ana created group “Family”"),
        (D(2021, 12, 31, 22, 2, 10), "media", "Ana", ""),
        (D(2021, 12, 31, 22, 3, 0), "text", "Ben", "Nice photo"),
        (D(2021, 12, 31, 22, 4, 30), "media", "Ana", "Fireworks!"),
        (D(2022, 1, 1, 0, 0, 1), "text", "Ben", "Frohes neues Jahr"),
        (D(2022, 1, 1, 0, 11), "media", "Ana", ""),  # < attached: ... > with spaces
        (D(2022, 1, 1, 0, 12), "media", "Ana", ""),  # Plan.pdf • 3 pages document omitted
        (D(2022, 1, 1, 0, 13), "service", None, "Ana added Carl"),
        (D(2022, 1, 1, 0, 14), "text", "Ben", "Hi Carl"),  # edited marker removed
    ]
    assert report.skipped == {"deleted": 1}
    assert all("\u200e" not in m.text for m in msgs)


def test_ios_us_12h_bracketed() -> None:
    msgs, report = read(FIX / "ios_us.txt")
    assert rows(msgs) == [
        (D(2021, 12, 31, 23, 58), "text", "Ana", "almost"),
        (D(2022, 1, 1, 9, 5, 3), "media", "Ben", ""),
    ]
    assert report.notes == []


def test_year_first_needs_no_inference() -> None:
    msgs, report = read(FIX / "year_first.txt")
    assert rows(msgs) == [
        (D(2021, 12, 31, 22, 1), "text", "Sven", "God jul"),
        (D(2022, 1, 2, 8, 5), "text", "Lisa", "Hej"),
    ]
    assert report.notes == []


def test_spanish_am_pm_media_deleted_edited() -> None:
    msgs, report = read(FIX / "spanish.txt")
    assert rows(msgs) == [
        (D(2021, 12, 31, 23, 50), "text", "Lucía", "Feliz año"),
        (D(2022, 1, 1, 0, 10), "text", "Pedro", "Igualmente"),  # 12:10 a. m.
        (D(2022, 1, 1, 12, 10), "media", "Lucía", ""),  # <Multimedia omitido>
        (D(2022, 1, 1, 12, 12), "text", "Lucía", "Vale, nos vemos"),
        (D(2022, 1, 1, 12, 13), "media", "Pedro", "La cena"),  # (archivo adjunto) + caption
    ]
    assert report.skipped == {"deleted": 1}


def test_german_dots_media_and_own_deleted_message_names_owner() -> None:
    msgs, report = read(FIX / "german.txt")
    assert rows(msgs) == [
        (D(2021, 12, 31, 22, 1), "text", "Jonas", "Guten Rutsch"),
        (D(2021, 12, 31, 22, 2), "media", "Mia", ""),  # <Medien ausgeschlossen>
        (D(2021, 12, 31, 22, 4), "media", "Jonas", ""),  # (Datei angehängt)
    ]
    assert report.skipped == {"deleted": 2}
    assert report.owners == {"Mia": "Mia"}  # "Du hast diese Nachricht gelöscht"


def test_dashes_without_comma_and_crlf() -> None:
    msgs, _ = read(FIX / "dashes_crlf.txt")
    assert rows(msgs) == [
        (D(2021, 12, 31, 22, 1), "text", "Piet", "Gelukkig nieuwjaar"),
        (D(2022, 1, 1, 0, 1), "text", "Sanne", "Jij ook"),
    ]


def test_undecidable_dates_default_to_day_first_with_a_note() -> None:
    msgs, report = read(FIX / "undecidable.txt")
    assert [m.timestamp for m in msgs] == [D(2021, 4, 3, 10, 0), D(2021, 6, 5, 11, 0)]
    assert len(report.notes) == 1
    assert "undecidable.txt" in report.notes[0] and "day/month" in report.notes[0]


def test_group_chat_with_every_quirk() -> None:
    msgs, report = read(FIX / "WhatsApp Chat with Trip Group.txt")
    assert rows(msgs) == [
        (D(2023, 7, 14, 9, 0), "service", None, ENC + " Tap to learn more."),  # after a BOM
        (D(2023, 7, 14, 9, 0), "service", None, 'Ana created group "Trip"'),
        (D(2023, 7, 14, 9, 1), "service", None, "You were added"),
        (D(2023, 7, 14, 9, 1), "service", None, "Ana added +34 600 123 456"),
        (
            D(2023, 7, 14, 9, 2),
            "text",
            "Ana",
            "Welcome everyone!\nPlan:\n- fly Friday\n- hike Saturday",
        ),
        (D(2023, 7, 14, 9, 3), "text", "+34 600 123 456", "Gracias +34 600 999 000!"),
        (D(2023, 7, 14, 9, 4), "text", "Marta", "Hi, I'm Marta"),  # ~ Name
        (D(2023, 7, 14, 9, 5), "media", "Ana", "Our hotel"),  # (file attached) + caption
        (D(2023, 7, 14, 9, 6), "media", "Marta", ""),
        (D(2023, 7, 14, 9, 7), "media", "Ana", ""),  # sticker omitted
        (D(2023, 7, 14, 9, 10), "text", "Carlos", "See you at the airport"),
        (D(2023, 7, 14, 8, 30), "text", "Ana", "Sent offline earlier"),  # goes backwards
        (
            D(2023, 7, 14, 9, 12),
            "service",
            None,
            'Ana changed the subject from "Trip" to "Trip: Pyrenees"',
        ),
        (D(2023, 7, 14, 9, 13), "media", "Carlos", ""),  # GIF omitted
    ]
    assert report.skipped == {"deleted": 2, "view_once": 2}
    assert report.owners == {"Carlos": "Carlos"}  # "You deleted this message"
    assert msgs[0].chat_name == "Trip Group"
    invisible = "\ufeff\u200e\u200f\u202a\u202c"
    for m in msgs:
        assert not any(c in m.text + (m.author or "") for c in invisible)
        assert m.author_id == m.author


def test_ios_zip_with_chat_txt_and_media(tmp_path: Path) -> None:
    z = tmp_path / "WhatsApp Chat - Family (1).zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(FIX / "ios_chat.txt", "_chat.txt")
        zf.writestr("00000012-PHOTO-2021-12-31-22-04-30.jpg", b"\xff\xd8\xff\xe0 not text")
        zf.writestr("__MACOSX/._chat.txt", b"\x00\x05\x16\x07")
    msgs, report = read(z)
    plain, _ = read(FIX / "ios_chat.txt")
    assert rows(msgs) == rows(plain)
    assert {m.chat_name for m in msgs} == {"Family"}
    assert {m.chat_id for m in msgs} == {"wa:Family"}
    assert report.skipped == {"deleted": 1}


def test_android_zip_names_chat_from_member(tmp_path: Path) -> None:
    z = tmp_path / "export.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("IMG-20211231-WA0001.jpg", b"\xff\xd8")
        zf.write(FIX / "WhatsApp Chat with Bob Smith.txt", "WhatsApp Chat with Bob Smith.txt")
    msgs, _ = read(z)
    assert len(msgs) == 6 and {m.chat_id for m in msgs} == {"wa:Bob Smith"}


def test_zip_picks_the_txt_that_is_a_chat(tmp_path: Path) -> None:
    z = tmp_path / "mixed.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("notes.txt", "shopping list\nmilk\n")
        zf.write(FIX / "year_first.txt", "chat.txt")
    msgs, _ = read(z)
    assert [m.text for m in msgs] == ["God jul", "Hej"]
    assert msgs[0].chat_name == "mixed"


def test_overlapping_exports_give_the_same_ids() -> None:
    a, _ = read(FIX / "overlap" / "WhatsApp Chat with Carol.txt")
    b, _ = read(FIX / "overlap" / "WhatsApp Chat with Carol (1).txt")
    assert {m.chat_id for m in a + b} == {"wa:Carol"}  # " (1)" copy suffix stripped
    ids_a = {(m.timestamp, m.author, m.text, m.id) for m in a}
    ids_b = {(m.timestamp, m.author, m.text, m.id) for m in b}
    assert len(ids_a & ids_b) == 3  # "two" and both identical "ok" messages
    assert len({m.id for m in a}) == 4  # two identical messages still get distinct ids
    again, _ = read(FIX / "overlap" / "WhatsApp Chat with Carol.txt")
    assert [m.id for m in again] == [m.id for m in a]


def test_month_first_evidence_decides_order(tmp_path: Path) -> None:
    p = tmp_path / "us.txt"
    p.write_text("03/04/21, 10:00 - A: x\n03/14/21, 10:00 - A: y\n", encoding="utf-8")
    msgs, report = read(p)
    assert [m.timestamp for m in msgs] == [D(2021, 3, 4, 10, 0), D(2021, 3, 14, 10, 0)]
    assert report.notes == []


def test_conflicting_date_order_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "mixed_order.txt"
    p.write_text(
        "13/01/2021, 10:00 - A: day first\n01/02/2021, 10:00 - A: ?\n01/13/2021, 10:00 - A: x\n",
        encoding="utf-8",
    )
    with pytest.raises(ExportError) as e:
        read(p)
    assert "mixed_order.txt" in str(e.value) and "lines 1 and 3" in str(e.value)


def test_impossible_hour_is_a_bad_timestamp(tmp_path: Path) -> None:
    p = tmp_path / "h.txt"
    p.write_text("12/31/21, 13:05 PM - A: no\nmore\n12/31/21, 1:05 PM - A: yes\n", encoding="utf-8")
    msgs, report = read(p)
    assert rows(msgs) == [(D(2021, 12, 31, 13, 5), "text", "A", "yes")]
    assert report.skipped == {"bad timestamp": 1}


def test_stray_lines_before_the_first_header_are_skipped(tmp_path: Path) -> None:
    p = tmp_path / "cut.txt"
    p.write_text("tail of an older message\n\n31/12/2021, 22:01 - A: hi\n", encoding="utf-8")
    msgs, report = read(p)
    assert rows(msgs) == [(D(2021, 12, 31, 22, 1), "text", "A", "hi")]
    assert report.skipped == {"text before first message": 1}


@pytest.mark.parametrize(
    ("name", "content", "where"),
    [
        ("empty.txt", b"", None),
        ("blank.txt", b"\xef\xbb\xbf\n  \n", None),
        ("notes.txt", b"\nDear diary,\ntoday I wrote a CSV\n", "(line 2)"),
        ("latin1.txt", "31/12/2021, 22:01 - A: hi\nB: caf\xe9\n".encode("latin-1"), "line 2"),
    ],
)
def test_malformed_text_files_raise_naming_the_file(
    tmp_path: Path, name: str, content: bytes, where: str | None
) -> None:
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(ExportError) as e:
        read(p)
    assert name in str(e.value)
    if where:
        assert where in str(e.value)


def test_header_too_far_down_is_not_whatsapp(tmp_path: Path) -> None:
    p = tmp_path / "essay.txt"
    p.write_text("a\nb\nc\nd\ne\n31/12/2021, 22:01 - A: hi\n", encoding="utf-8")
    with pytest.raises(ExportError, match=r"essay\.txt \(line 1\)"):
        read(p)


def test_zip_without_chat_raises(tmp_path: Path) -> None:
    z = tmp_path / "photos.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("IMG-1.jpg", b"\xff\xd8")
        zf.writestr("readme.txt", "not a chat\n")
    with pytest.raises(ExportError, match=r"photos\.zip"):
        read(z)


def test_bad_zip_raises(tmp_path: Path) -> None:
    z = tmp_path / "broken.zip"
    z.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(ExportError, match=r"broken\.zip"):
        read(z)


def test_non_utf8_member_in_zip_names_zip_and_line(tmp_path: Path) -> None:
    z = tmp_path / "WhatsApp Chat - X.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("_chat.txt", "[31.12.21, 22:01:05] A: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ExportError) as e:
        read(z)
    assert "WhatsApp Chat - X.zip" in str(e.value) and "line 1" in str(e.value)


def test_renamed_copy_of_a_fixture_keeps_parsing(tmp_path: Path) -> None:
    p = tmp_path / "WhatsApp Chat - Bob Smith (2).txt"
    shutil.copy(FIX / "WhatsApp Chat with Bob Smith.txt", p)
    msgs, _ = read(p)
    original, _ = read(FIX / "WhatsApp Chat with Bob Smith.txt")
    assert [m.id for m in msgs] == [m.id for m in original]  # same chat name, same ids


@pytest.mark.parametrize("path", sorted(FIX.rglob("*.txt")), ids=lambda p: p.name)
def test_sniff_accepts_every_fixture(path: Path) -> None:
    assert sniff_whatsapp(path.read_text(encoding="utf-8")[:65536])


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        ("\ufeff\u200e[31.12.21, 22:01:05] Ana: hi\n", True),
        ("\n\n12/31/21, 10:01\u202fPM - Bob: hi", True),
        ("31/12/21, 12:10\u202fp.\u00a0m. - Lucía: hola\n", True),
        ("2021-12-31, 22:01 - Sven: hej\n", True),
        ("author,text,timestamp\nAna,hi,2021-12-31\n", False),
        ('{"name": "x", "messages": []}', False),
        ("a\nb\nc\nd\ne\n31/12/2021, 22:01 - A: hi\n", False),
        ("31/12/2021 - no time here\n", False),
        ("", False),
    ],
)
def test_sniff(head: str, expected: bool) -> None:
    assert sniff_whatsapp(head) is expected
