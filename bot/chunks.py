"""Split a message at a platform's length limit, on line, then sentence, then word boundaries."""

from __future__ import annotations

import re

DISCORD_LIMIT = 2000
TELEGRAM_LIMIT = 4096
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")


def split_message(text: str, limit: int) -> list[str]:
    """Pieces of at most `limit` characters that join back to the text (up to whitespace)."""
    text = text.strip()
    if len(text) <= limit:
        return [text] if text else []
    pieces: list[str] = []
    for unit_re in ("\n", _SENTENCE_END, " "):
        cut = _last_break(text, limit, unit_re)
        if cut:
            break
    else:
        cut = limit  # one unbroken run longer than the limit: cut it hard
    pieces.append(text[:cut].rstrip())
    return pieces + split_message(text[cut:], limit)


def _last_break(text: str, limit: int, unit: str | re.Pattern[str]) -> int:
    """Index just after the last break of this kind within the first `limit` characters."""
    window = text[: limit + 1]
    if isinstance(unit, str):
        i = window.rfind(unit)
        return i + 1 if i > 0 else 0
    ends = [m.end() for m in unit.finditer(window) if m.start() <= limit]
    return ends[-1] if ends and ends[-1] > 0 else 0
