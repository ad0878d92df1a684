"""Simple CSV tables: question/answer knowledge bases and speaker/text transcripts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from training.importers.tables import read_qa_csv, read_speaker_csv, sniff_table
from training.message import ExportError, ImportReport, Message

FIXTURES = Path(__file__).parent / "fixtures" / "tables"


def read(reader, path: Path) -> tuple[list[Message], ImportReport]:
    report = ImportReport()
    return list(reader(path, report)), report


def test_qa_with_context():
    messages, report = read(read_qa_csv, FIXTURES / "faq.csv")
    assert [(m.chat_id, m.id, m.author_id, m.author, m.text, m.reply_to) for m in messages] == [
        ("faq:1", "1c", "context", "context", "We met at a conference", None),
        ("faq:1", "1q", "asker", "asker", "What do you do for work?", None),
        ("faq:1", "1a", "me", "me", "I write code, mostly Python.", "1q"),
        # An empty context cell adds no context message; a quoted answer keeps its line break.
        ("faq:2", "2q", "asker", "asker", "Favourite food?", None),
        ("faq:2", "2a", "me", "me", "Pizza.\nDefinitely pizza.", "2q"),
        # Rows 3 (no answer), 4 (six cells for four columns), 5 (blank question) are skipped;
        # the blank line after them is not a row.
        ("faq:6", "6q", "asker", "asker", "Where do you live?", None),
        ("faq:6", "6a", "me", "me", "Berlin", "6q"),
    ]
    assert report.skipped == {"empty": 2, "malformed row": 1}
    assert report.owners == {"me": "me"}
    assert {(m.platform, m.chat_name, m.timestamp, m.kind) for m in messages} == {
        ("csv", "faq", None, "text")
    }


def test_qa_without_context():
    messages, report = read(read_qa_csv, FIXTURES / "qa_simple.csv")
    assert [(m.chat_id, m.id, m.author, m.text, m.reply_to) for m in messages] == [
        ("qa_simple:1", "1q", "asker", "How are you?", None),
        ("qa_simple:1", "1a", "me", "Fine, thanks!", "1q"),
        ("qa_simple:2", "2q", "asker", "And you?", None),
        ("qa_simple:2", "2a", "me", "Also fine", "2q"),
    ]
    assert report.skipped == {}
    assert report.owners == {"me": "me"}


def test_speaker_csv():
    messages, report = read(read_speaker_csv, FIXTURES / "transcript.csv")
    assert [(m.id, m.author_id, m.author, m.text, m.timestamp) for m in messages] == [
        ("r1", "Ana", "Ana", "Hola, qué tal?", datetime(2024, 3, 1, 10, 0, tzinfo=UTC)),
        # CRLF inside the quoted cell comes out as "\n"; the offset is kept.
        ("r2", "Ben", "Ben", "Good.\nYou?",
         datetime(2024, 3, 1, 10, 1, tzinfo=timezone(timedelta(hours=2)))),
        ("r3", "Ana", "Ana", "local time", datetime(2024, 3, 1, 10, 2)),
        ("r4", "Ben", "Ben", "epoch seconds", datetime(2024, 3, 1, 10, 3, tzinfo=UTC)),
        ("r5", "Ana", "Ana", "no time at all", None),
        # r6 has an unreadable time, r7 no text.
        ("r8", "Ben", "Ben", "epoch millis", datetime(2024, 3, 1, 10, 6, tzinfo=UTC)),
    ]
    assert messages[2].timestamp.tzinfo is None  # no zone in the file: naive
    assert report.skipped == {"bad timestamp": 1, "empty": 1}
    assert {(m.platform, m.chat_id, m.chat_name, m.kind, m.reply_to) for m in messages} == {
        ("csv", "transcript", "transcript", "text", None)
    }


def test_speaker_csv_without_timestamp_column(tmp_path):
    path = tmp_path / "talk.csv"
    path.write_text("Author,Text\nAna,hi\n,nobody\nBen,hey\n", encoding="utf-8")
    messages, report = read(read_speaker_csv, path)
    assert [(m.id, m.author, m.text, m.timestamp) for m in messages] == [
        ("r1", "Ana", "hi", None), ("r3", "Ben", "hey", None),
    ]
    assert report.skipped == {"missing author": 1}


@pytest.mark.parametrize("reader", [read_qa_csv, read_speaker_csv])
def test_not_utf8_names_file_and_line(tmp_path, reader):
    path = tmp_path / "latin1.csv"
    header = b"question,answer\n" if reader is read_qa_csv else b"author,text\n"
    path.write_bytes(header + b"ok,fine\ncaf\xe9,yes\n")
    with pytest.raises(ExportError) as err:
        list(reader(path, ImportReport()))
    assert "latin1.csv" in str(err.value)
    assert err.value.where.startswith("line 3")


@pytest.mark.parametrize("reader", [read_qa_csv, read_speaker_csv])
def test_empty_file(tmp_path, reader):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(ExportError) as err:
        list(reader(path, ImportReport()))
    assert err.value.path == str(path)
    assert err.value.reason == "empty file"


def test_missing_header_names_line_1(tmp_path):
    path = tmp_path / "noheader.csv"
    path.write_text("What time is it?,Noon\n", encoding="utf-8")
    with pytest.raises(ExportError) as err:
        list(read_qa_csv(path, ImportReport()))
    assert "noheader.csv" in str(err.value)
    assert err.value.where == "line 1"
    # A question/answer table is not a speaker table either.
    with pytest.raises(ExportError) as err:
        list(read_speaker_csv(FIXTURES / "qa_simple.csv", ImportReport()))
    assert err.value.where == "line 1"
    assert "author, text" in err.value.reason


def test_nul_bytes_are_an_error(tmp_path):
    path = tmp_path / "binary.csv"
    path.write_bytes(b"author,text\nAna,h\x00i\n")
    with pytest.raises(ExportError) as err:
        list(read_speaker_csv(path, ImportReport()))
    assert err.value.path == str(path)
    assert err.value.where == "line 2"


def test_sniff_table():
    assert sniff_table("question,answer") == "qa-csv"
    assert sniff_table("\ufeffQuestion,Answer,Context,Notes\r\n") == "qa-csv"
    assert sniff_table("author,text,timestamp") == "speaker-csv"
    assert sniff_table("Author , Text") == "speaker-csv"
    assert sniff_table("AuthorID,Author,Date,Content,Attachments,Reactions") is None
    assert sniff_table("12/31/21, 10:01 PM - Ana: hi") is None
    assert sniff_table("") is None
