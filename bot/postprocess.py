"""Turn what the model wrote into the messages the clone sends.

The model writes one turn; the person texts in bursts, one message per line (the prompt
contract renders a burst that way). So: cut where the turn ends, drop lines that put words in
someone else's mouth, split into messages, cap their number and length. A turn cut short by the
token cap loses its unfinished end: better "see you at 8" than "see you at 8, just w".
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from training.prompt import turn_text

MAX_MESSAGES = 6
MAX_CHARS = 1000
_SENTENCE_END = re.compile(r"[.!?…)]+(?=\s|$)")


def drop_unfinished(text: str) -> str:
    """A turn the token cap cut off, without its unfinished end: the last line goes when there are
    others; a single line ends at its last sentence, else at its last whole word and an ellipsis."""
    lines = text.rstrip().split("\n")
    kept = [line for line in lines[:-1] if line.strip()]
    if kept:
        return "\n".join(kept)
    line = lines[-1].strip()
    ends = [m.end() for m in _SENTENCE_END.finditer(line)]
    if ends:
        return line[: ends[-1]]
    words = line.split(" ")
    return " ".join(words[:-1]).rstrip(",;:-") + "…" if len(words) > 1 else ""


RECALL_ANSWER = re.compile(r"^A:\s*")


def to_messages(
    text: str,
    other_speakers: Iterable[str] = (),
    max_messages: int = MAX_MESSAGES,
    max_chars: int = MAX_CHARS,
    truncated: bool = False,
) -> list[str]:
    """The burst of messages in a generated reply; [] when nothing usable is left.

    `truncated`: the model was stopped by the token cap before it ended its turn."""
    ended = turn_text(text)
    text = drop_unfinished(text) if truncated and ended == text else ended
    names = sorted({n.strip() for n in other_speakers if n and n.strip()}, key=len, reverse=True)
    speaker = re.compile(
        r"^\s*(?:" + "|".join(re.escape(n) for n in names) + r")\s*:", re.IGNORECASE
    ) if names else None
    messages: list[str] = []
    for line in text.split("\n"):
        if speaker and speaker.match(line):
            break  # the model began writing another person's lines: the reply ends here
        line = line.strip()
        if line.startswith("> "):  # a quote is context the contract shows, never something to send
            continue
        if not messages:  # "A: " copied from the recalled "Q: … A: …" lines is not the reply
            line = RECALL_ANSWER.sub("", line, count=1)
        if line:
            messages.append(line if len(line) <= max_chars else line[: max_chars - 1].rstrip() + "…")
        if len(messages) == max_messages:
            break
    return messages
