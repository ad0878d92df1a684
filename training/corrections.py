"""The owner's corrections of what their clone said: `<persona>/corrections.jsonl`.

One JSON object a line:

    {"id", "created", "reply_id", "source",        which reply, from where (console, telegram, discord)
     "context": [{"role", "content"}, ...],        the prompt's conversation turns (no system prompt)
     "recalled": [{"text", "asked", "speaker"}],   what the reply drew on
     "reply": "...",                               what the clone said (its messages, one a line)
     "text": "..." | "rating": "good" | "bad",     what the owner would have said, or a verdict
     "edited": "..."}                              when the owner last changed it (absent if never)

`clone prepare` and `clone retrain` read them (training.feedback) as supervised samples (context
-> text, or -> reply when rated good) and as preference pairs (text preferred over reply). It lives in
training/ because training reads it; the console and the bots' /correct write it.

Adding appends one whole line with a single write, so a crash can leave at most a torn last line
(skipped on reading, and never glued to the next one). Editing and deleting rewrite the file
through atomic_file. Both take an exclusive lock on a sibling lock file, so an append from another
process never lands in a file that is being replaced. Nothing here logs: corrections are private.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from training.atomic import atomic_file

FILENAME = "corrections.jsonl"
RATINGS = ("good", "bad")
MAX_TEXT_CHARS = 4000  # a correction is one chat reply, not a document


class CorrectionError(ValueError):
    """A correction that is malformed (its message names the field, never its text)."""


def corrections_file(persona_root: Path) -> Path:
    return persona_root / FILENAME


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _verdict(text: str | None, rating: str | None) -> dict:
    """Exactly one of a corrected text and a rating, checked."""
    if (text is None) == (rating is None):
        raise CorrectionError("give either the text you would have said or a rating, not both")
    if rating is not None:
        if rating not in RATINGS:
            raise CorrectionError(f"rating must be one of {', '.join(RATINGS)}")
        return {"rating": rating}
    assert text is not None
    text = text.strip()
    if not text:
        raise CorrectionError("the corrected text is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise CorrectionError(f"the corrected text is longer than {MAX_TEXT_CHARS} characters")
    return {"text": text}


def add(path: Path, *, reply_id: str, context: Sequence[dict], reply: str, text: str | None = None,
        rating: str | None = None, recalled: Sequence[dict] = (), source: str = "console") -> dict:
    """Store a correction of one reply; the stored object (with its new id)."""
    correction = {
        "id": uuid.uuid4().hex, "created": _now(), "reply_id": reply_id, "source": source,
        "context": [{"role": m["role"], "content": m["content"]} for m in context],
        "recalled": list(recalled), "reply": reply, **_verdict(text, rating),
    }
    line = json.dumps(correction, ensure_ascii=False).encode("utf-8") + b"\n"
    with _locked(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size and _last_byte(path) != b"\n":
                line = b"\n" + line  # a torn line from a crash stays alone, and is skipped
            while line:  # one write for a regular file; the loop only guards a short one
                line = line[os.write(fd, line):]
            os.fsync(fd)
        finally:
            os.close(fd)
    return correction


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def load(path: Path) -> list[dict]:
    """Every readable correction, oldest first; a torn or foreign line is passed over."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    found = []
    for line in lines:
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            found.append(item)
    return found


def _rewrite(path: Path, items: list[dict]) -> None:
    with atomic_file(path) as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    os.chmod(path, 0o600)


def edit(path: Path, correction_id: str, *, text: str | None = None, rating: str | None = None) -> dict:
    """Replace a correction's text or rating; the stored object. KeyError when there is none."""
    verdict = _verdict(text, rating)
    with _locked(path):
        items = load(path)
        found = next((c for c in items if c["id"] == correction_id), None)
        if found is None:
            raise KeyError(correction_id)
        found.pop("text", None)
        found.pop("rating", None)
        found.update(verdict, edited=_now())
        _rewrite(path, items)
    return found


def delete(path: Path, correction_id: str) -> bool:
    """Remove a correction; whether there was one."""
    with _locked(path):
        items = load(path)
        kept = [c for c in items if c["id"] != correction_id]
        if len(kept) == len(items):
            return False
        _rewrite(path, kept)
    return True
