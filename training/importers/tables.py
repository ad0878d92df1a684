"""Hand-written CSV tables: question/answer knowledge bases and speaker/text transcripts.

Also home of `table_rows`, the header-checked CSV row stream the Discord CSV readers share.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from training.importers.common import decoded_lines
from training.limits import MAX_MESSAGE_CHARS, MAX_RECORD_BYTES, TOO_LONG, size_text
from training.message import ExportError, ImportReport, Message

PLATFORM = "csv"
# Who asks and who answers in a question/answer table (the answers are the person's).
QA_ASKER, QA_ANSWERER = "asker", "me"
# Epoch values above this are milliseconds: as seconds they would fall after the year 5000.
_EPOCH_MS_FROM = 10**11


def header_names(header_line: str) -> list[str]:
    """The column names of one CSV header line, BOM and case dropped."""
    line = header_line.removeprefix("\ufeff").rstrip("\r\n")
    try:
        row = next(csv.reader([line]), [])
    except csv.Error:
        return []
    return [name.strip().lower() for name in row]


class _TextLines:
    """UTF-8 lines for the csv module; a NUL byte means binary data (csv would pass it on).

    Counts the characters of the record being read (`record`, reset by the caller after each
    one), so a record of many quoted multi-line cells cannot grow without bound either.
    """

    def __init__(self, f: BinaryIO, path: Path) -> None:
        self._lines = enumerate(decoded_lines(f, path), start=1)
        self.path = path
        self.record = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        lineno, line = next(self._lines)
        if "\x00" in line:
            raise ExportError(self.path, f"line {lineno}", "binary data (NUL bytes): not a CSV table")
        self.record += len(line)
        if self.record > MAX_RECORD_BYTES:
            raise ExportError(self.path, f"line {lineno}",
                              f"one record over {size_text(MAX_RECORD_BYTES)}: not a chat table")
        return line


def table_rows(
    path: Path,
    required: Sequence[str],
    optional: Sequence[str],
    report: ImportReport,
    what: str,
) -> Iterator[tuple[int, dict[str, str]]]:
    """Stream a CSV file's records as (row number, {column: cell}) for the named columns.

    Columns are found by name, case-insensitively; other columns are ignored. Row numbers count
    data records from 1 (the header is not one; blank lines are not either). A record whose cell
    count differs from the header's is skipped as "malformed row". CRLF inside a cell becomes
    LF. Raises ExportError for an empty file, a missing header, text that is not UTF-8, or CSV
    the csv module cannot read.
    """
    # A cell may be as long as a record (csv's default stops at 128 KiB and refuses the whole
    # file); a cell longer than a message skips its row below.
    csv.field_size_limit(MAX_RECORD_BYTES)
    with open(path, "rb") as f:
        # decoded_lines names the exact line of a bad byte; csv keeps quoted newlines intact.
        lines = _TextLines(f, path)
        reader = csv.reader(lines)
        try:
            header = next(reader, None)
            while header == []:  # blank lines before the header
                header = next(reader, None)
            if header is None:
                raise ExportError(path, None, "empty file")
            names = [name.strip().lower() for name in header]
            missing = [c for c in required if c not in names]
            if missing:
                raise ExportError(
                    path, f"line {reader.line_num}",
                    f"not a {what}: the header lacks column(s) {', '.join(missing)}",
                )
            index = {c: names.index(c) for c in (*required, *optional) if c in names}
            rowno = 0
            for row in reader:
                lines.record = 0
                if not row:  # a blank line between records
                    continue
                rowno += 1
                if len(row) != len(header):
                    report.skip("malformed row")
                    continue
                if any(len(row[i]) > MAX_MESSAGE_CHARS for i in index.values()):
                    report.skip(TOO_LONG)
                    continue
                # Quoted cells keep the file's line breaks; text uses plain "\n".
                yield rowno, {c: row[i].replace("\r\n", "\n") for c, i in index.items()}
        except csv.Error as e:
            raise ExportError(path, f"line {reader.line_num}", f"unreadable CSV: {e}") from None


def parse_table_time(value: str) -> datetime | None:
    """ISO 8601 (aware when it carries an offset or Z, naive otherwise) or epoch seconds.

    Returns None for an empty cell; raises ValueError for anything else it cannot read.
    """
    value = value.strip()
    if not value:
        return None
    try:
        epoch = float(value)
    except ValueError:
        return datetime.fromisoformat(value)
    if epoch != epoch or abs(epoch) == float("inf"):  # nan / inf parse as floats
        raise ValueError(value)
    if abs(epoch) >= _EPOCH_MS_FROM:
        epoch /= 1000
    try:
        return datetime.fromtimestamp(epoch, tz=UTC)
    except (OverflowError, OSError) as e:
        raise ValueError(value) from e


def read_qa_csv(path: Path, report: ImportReport) -> Iterator[Message]:
    """A `question,answer[,context]` table: one exchange per row, the answers the owner's."""
    path = Path(path)
    report.owners[QA_ANSWERER] = QA_ANSWERER
    stem = path.stem
    rows = table_rows(path, ("question", "answer"), ("context",), report, "question/answer table")
    for rowno, cells in rows:
        question, answer = cells["question"].strip(), cells["answer"].strip()
        if not question or not answer:
            report.skip("empty")
            continue
        context = cells.get("context", "").strip()
        if context:
            yield _qa_message(stem, rowno, "c", "context", context)
        yield _qa_message(stem, rowno, "q", QA_ASKER, question)
        yield _qa_message(stem, rowno, "a", QA_ANSWERER, answer, reply_to=f"{rowno}q")


def _qa_message(
    stem: str, rowno: int, suffix: str, who: str, text: str, reply_to: str | None = None
) -> Message:
    return Message(
        platform=PLATFORM, chat_id=f"{stem}:{rowno}", chat_name=stem, id=f"{rowno}{suffix}",
        author_id=who, author=who, timestamp=None, text=text, kind="text", reply_to=reply_to,
    )


def read_speaker_csv(path: Path, report: ImportReport) -> Iterator[Message]:
    """An `author,text[,timestamp]` transcript: one chat per file, one message per row."""
    path = Path(path)
    stem = path.stem
    rows = table_rows(path, ("author", "text"), ("timestamp",), report, "speaker/text table")
    for rowno, cells in rows:
        author, text = cells["author"].strip(), cells["text"].strip()
        if not text:
            report.skip("empty")
            continue
        if not author:
            report.skip("missing author")
            continue
        try:
            timestamp = parse_table_time(cells.get("timestamp", ""))
        except ValueError:
            report.skip("bad timestamp")
            continue
        yield Message(
            platform=PLATFORM, chat_id=stem, chat_name=stem, id=f"r{rowno}",
            author_id=author, author=author, timestamp=timestamp, text=text, kind="text",
            reply_to=None,
        )


def sniff_table(header_line: str) -> str | None:
    """Which table a CSV header line announces: "qa-csv", "speaker-csv", or None."""
    names = set(header_names(header_line))
    if {"question", "answer"} <= names:
        return "qa-csv"
    if {"author", "text"} <= names:
        return "speaker-csv"
    return None
