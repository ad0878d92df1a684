"""Read chat exports of every supported kind into one stream of normalized messages.

The format of each file is detected from its content (`--format` forces one); folders are
walked. A file that is named explicitly but cannot be read is an error that names the file and
the place; inside a walked folder, files that are not exports (photos, voice notes, HTML) are
passed over and counted.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from training.importers import discord, tables, telegram, whatsapp
from training.message import FIELDS, ExportError, ImportReport, Message

Reader = Callable[[Path, ImportReport], Iterator[Message]]
HEAD_BYTES = 64 * 1024
# Files that sit beside the chat in real export folders and are never chats themselves.
NOT_CHATS = {
    ".jpg", ".jpeg", ".png", ".gif", ".webp", ".heic", ".mp4", ".mov", ".webm", ".opus", ".ogg",
    ".mp3", ".m4a", ".wav", ".pdf", ".vcf", ".tgs", ".html", ".htm", ".css", ".js", ".ico",
}


def read_messages_jsonl(path: Path, report: ImportReport) -> Iterator[Message]:
    """Re-read the output of `clone import`."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield Message.from_dict(json.loads(raw))
            except (ValueError, KeyError, TypeError):
                report.skip("malformed message")
                if lineno == 1:
                    raise ExportError(path, "line 1", "not a normalized messages file") from None


READERS: dict[str, Reader] = {
    "telegram": telegram.read_telegram,
    "whatsapp": whatsapp.read_whatsapp,
    "discord-json": discord.read_discord_json,
    "discord-csv": discord.read_discord_csv,
    "discord-package": discord.read_discord_package,
    "qa-csv": tables.read_qa_csv,
    "speaker-csv": tables.read_speaker_csv,
    "messages-jsonl": read_messages_jsonl,
}
FORMATS = tuple(READERS)


def _decode_head(head: bytes) -> str | None:
    """The head as text, or None when it is not UTF-8 (a cut at the end is forgiven)."""
    try:
        return head.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if e.start >= len(head) - 3 and len(head) == HEAD_BYTES:
            return head[: e.start].decode("utf-8-sig")
        return None


def detect_format(path: Path) -> str:
    """Name the format of one file or folder from what it contains."""
    if path.is_dir():
        if discord.is_discord_package(path):
            return "discord-package"
        raise ExportError(path, None, "a folder that is not a Discord data package")
    with path.open("rb") as f:
        head = f.read(HEAD_BYTES)
    if not head.strip():
        raise ExportError(path, None, "empty file")
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = [n.lower() for n in z.namelist()]
        except zipfile.BadZipFile:
            raise ExportError(path, None, "damaged zip file") from None
        if any(n.endswith("messages/index.json") for n in names):
            raise ExportError(path, None, "a Discord data package: extract the zip and pass the folder")
        return "whatsapp"
    text = _decode_head(head)
    if text is None or "\x00" in text:
        raise ExportError(path, "start of file", "binary data or not UTF-8 text: not a chat export")
    stripped = text.lstrip("\ufeff \t\r\n")
    if whatsapp.sniff_whatsapp(text):  # before JSON: iOS lines start with "[31.12.21, ..."
        return "whatsapp"
    if stripped.startswith(("{", "[")):
        if discord.sniff_discord_json(head):
            return "discord-json"
        if telegram.sniff_telegram(head):
            return "telegram"
        first = stripped.split("\n", 1)[0]
        try:
            if set(json.loads(first)) >= set(FIELDS):
                return "messages-jsonl"
        except (ValueError, TypeError):
            pass
        raise ExportError(path, "start of file", "JSON, but not a chat export this tool knows")
    header = stripped.split("\n", 1)[0].strip()
    if discord.sniff_discord_csv(header):
        return "discord-csv"
    table = tables.sniff_table(header)
    if table:
        return table
    raise ExportError(path, "start of file", "unknown format (use --format to force one)")


def find_sources(
    paths: list[Path], report: ImportReport, fmt: str | None = None
) -> list[tuple[Path, str]]:
    """Each export file (or data-package folder) under `paths`, with its format."""
    sources: list[tuple[Path, str]] = []

    def walk(folder: Path) -> None:
        if discord.is_discord_package(folder):
            sources.append((folder, "discord-package"))
            return
        for child in sorted(folder.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_dir():
                walk(child)
            elif child.suffix.lower() in NOT_CHATS:
                report.skip("file that is not a chat export")
            elif fmt:
                sources.append((child, fmt))
            else:
                try:
                    sources.append((child, detect_format(child)))
                except ExportError:
                    report.skip("file that is not a chat export")

    for path in paths:
        if not path.exists():
            raise ExportError(path, None, "no such file or folder")
        if path.is_file() or fmt == "discord-package":
            sources.append((path, fmt or detect_format(path)))
        else:
            walk(path)
    return sources


def import_messages(
    paths: list[Path], report: ImportReport, fmt: str | None = None
) -> Iterator[Message]:
    """Every message of every export under `paths`, in file order."""
    if fmt is not None and fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    for path, source_fmt in find_sources(paths, report, fmt):
        report.files.append((str(path), source_fmt))
        yield from READERS[source_fmt](path, report)
