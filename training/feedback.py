"""The owner's corrections (training.corrections) as training data: samples and preference pairs.

Each correction is one prompt the clone answered: its conversation turns, what it recalled, its
reply, and the owner's verdict. Read top to bottom:
  1. clean      a correction's fields checked, every text redacted like the chats (training.privacy);
                a malformed one is skipped and counted, never quoted
  2. prompt     the prompt contract's system prompt with the recalled items the reply drew on, then
                the conversation, its oldest turns dropped until the answer fits the sample budget
  3. samples    context -> the owner's text; a reply rated good -> that reply. Marked `correction`
                so training repeats them (TrainConfig.correction_weight) and learns their last
                turn alone: the assistant turns of the context are the clone's, not the person's
  4. pairs      within one prompt, every answer the owner gave or rated good is preferred over
                every reply they corrected or rated bad; a bad rating with nothing better for its
                prompt teaches no direction and is skipped (TRL's conversational preference format)

Nothing here logs or raises with a correction's text: corrections are private.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from training.persona import Persona
from training.privacy import Redactor
from training.prompt import Recalled, prompt_tokens, system_prompt

ROLES = ("user", "assistant")
SOURCE_PREFIX = "correction:"  # a sample's `conversation`: never a chat's key


@dataclass(frozen=True)
class Correction:
    """One correction, checked and redacted."""

    id: str
    context: tuple[tuple[str, str], ...]  # (role, content), the owner's message last
    recalled: tuple[Recalled, ...]
    reply: str
    text: str | None
    rating: str | None

    @property
    def prompt_key(self) -> str:
        """Corrections of the same prompt share this (a rating and a text of one reply, say)."""
        return json.dumps([self.context, [(r.text, r.asked, r.speaker) for r in self.recalled]])


@dataclass
class Feedback:
    samples: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)
    read: int = 0
    used: int = 0  # corrections that gave a sample or a pair
    skipped: Counter[str] = field(default_factory=Counter)
    redactions: Counter[str] = field(default_factory=Counter)

    def card(self) -> dict:
        """What the dataset card records: counts only."""
        return {"read": self.read, "used": self.used, "samples": len(self.samples),
                "pairs": len(self.pairs), "skipped": dict(sorted(self.skipped.items()))}


# -- 1. clean --------------------------------------------------------------------------------------


class _Scrub:
    """Redacts each text and tallies what it found."""

    def __init__(self, persona: Persona, counts: Counter[str]) -> None:
        self.redactor, self.counts = Redactor(persona.blocklist), counts

    def __call__(self, text: str) -> str:
        out, found = self.redactor.redact(text)
        self.counts.update(found)
        return out


def _strings(value: object) -> bool:
    return isinstance(value, str)


def _context(raw: object, scrub: _Scrub) -> tuple[tuple[str, str], ...] | None:
    if not isinstance(raw, list) or not raw:
        return None
    turns = []
    for m in raw:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not _strings(m.get("content")):
            return None
        turns.append((m["role"], scrub(m["content"])))
    return tuple(turns) if turns[-1][0] == "user" else None  # a reply answers the owner's message


def _recalled(raw: object, scrub: _Scrub) -> tuple[Recalled, ...] | None:
    if not isinstance(raw, list):
        return None
    found = []
    for r in raw:
        if not isinstance(r, dict) or not _strings(r.get("text")):
            return None
        asked, speaker = r.get("asked"), r.get("speaker")
        if not all(v is None or _strings(v) for v in (asked, speaker)):
            return None
        found.append(Recalled(scrub(r["text"]), asked and scrub(asked), speaker and scrub(speaker)))
    return tuple(found)


def clean(item: dict, scrub: _Scrub) -> Correction | None:
    """The correction checked and redacted; None when it is malformed."""
    context, recalled = _context(item.get("context"), scrub), _recalled(item.get("recalled", []), scrub)
    text, rating, reply = item.get("text"), item.get("rating"), item.get("reply")
    corrected = _strings(text) and bool(text.strip()) and rating is None
    rated = text is None and rating in ("good", "bad")
    if context is None or recalled is None or not _strings(reply) or not (corrected or rated):
        return None
    return Correction(str(item.get("id", "")), context, recalled, scrub(reply.strip()),
                      scrub(text.strip()) if text is not None else None, rating)


# -- 2. prompt -------------------------------------------------------------------------------------


def fit_prompt(c: Correction, persona: Persona, answers: Iterable[str], count_tokens: Callable[[str], int],
               max_tokens: int) -> list[dict[str, str]] | None:
    """The chat-template messages before the answer, through the prompt contract, fitting
    `max_tokens` with the longest of `answers`; the oldest turns go first, as serving drops them.
    None when even the owner's last message alone does not fit."""
    system = {"role": "system", "content": system_prompt(persona, c.recalled)}
    longest = max((prompt_tokens([{"role": "assistant", "content": a}], count_tokens) for a in answers),
                  default=0)
    for start in range(len(c.context)):
        messages = [system, *({"role": r, "content": t} for r, t in c.context[start:])]
        if prompt_tokens(messages, count_tokens) + longest <= max_tokens:
            return messages
    return None


# -- 3 and 4. samples and pairs --------------------------------------------------------------------


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _answers(group: list[Correction]) -> tuple[list[str], list[str]]:
    """What the owner prefers for one prompt (their texts, replies rated good) and what they do
    not (the replies they corrected or rated bad), each once, in the corrections' order."""
    chosen = [c.text for c in group if c.text is not None]
    chosen += [c.reply for c in group if c.rating == "good" and c.reply]  # a good silence teaches nothing
    rejected = [c.reply for c in group if c.reply and c.rating != "good"]
    return list(dict.fromkeys(chosen)), list(dict.fromkeys(rejected))


def _group_data(group: list[Correction], persona: Persona, count_tokens: Callable[[str], int],
                max_tokens: int, out: Feedback) -> None:
    chosen, rejected = _answers(group)
    prompt = fit_prompt(group[0], persona, [*chosen, *rejected], count_tokens, max_tokens)
    if prompt is None:
        out.skipped["over the token budget"] += len(group)
        return
    source = SOURCE_PREFIX + group[0].id
    for answer in chosen:
        sample = {"messages": [*prompt, _assistant(answer)], "conversation": source, "correction": True}
        out.samples.append(sample)
    for good in chosen:
        for bad in rejected:
            if good != bad:
                pair = {"prompt": prompt, "chosen": [_assistant(good)], "rejected": [_assistant(bad)]}
                out.pairs.append({**pair, "conversation": source})
    if chosen:
        out.used += len(group)
    elif rejected:  # only bad ratings: no better answer to move towards
        out.skipped["rated bad with no better answer"] += len(group)
    else:
        out.skipped["rated good but empty"] += len(group)


def from_corrections(items: Sequence[dict], persona: Persona, count_tokens: Callable[[str], int],
                     max_tokens: int) -> Feedback:
    """Training samples and preference pairs from the owner's corrections (training.corrections.load)."""
    out = Feedback(read=len(items))
    scrub = _Scrub(persona, out.redactions)
    groups: dict[str, list[Correction]] = defaultdict(list)
    for item in items:
        c = clean(item, scrub)
        if item.get("context") == []:  # a /correct whose message had left the chat's window
            out.skipped["without the message it answered"] += 1
        elif c is None:
            out.skipped["malformed"] += 1
        else:
            groups[c.prompt_key].append(c)
    for group in groups.values():
        _group_data(group, persona, count_tokens, max_tokens, out)
    return out
