"""Turn what the model wrote into the messages the clone sends.

The model writes one turn; the person texts in bursts, one message per line (the prompt
contract renders a burst that way). So: cut at anything that would start another turn, drop
lines that put words in someone else's mouth, split into messages, cap their number and length.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MAX_MESSAGES = 6
MAX_CHARS = 1000
# Anything shaped like a chat-template marker ends the reply: the model would be starting a turn.
TEMPLATE_MARK = re.compile(r"<\|[a-z_]+\|>|</?s>|\[/?INST\]", re.IGNORECASE)


def to_messages(
    text: str,
    other_speakers: Iterable[str] = (),
    max_messages: int = MAX_MESSAGES,
    max_chars: int = MAX_CHARS,
) -> list[str]:
    """The burst of messages in a generated reply; [] when nothing usable is left."""
    mark = TEMPLATE_MARK.search(text)
    if mark:
        text = text[: mark.start()]
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
        if line:
            messages.append(line if len(line) <= max_chars else line[: max_chars - 1].rstrip() + "…")
        if len(messages) == max_messages:
            break
    return messages
