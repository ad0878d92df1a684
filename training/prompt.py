"""The prompt contract: one function turns (persona, recalled items, conversation) into
chat-template messages.

Training samples and live prompts both go through `to_chat_messages`, so the model is served
exactly the shape it was trained on. Recalled items (facts from the person's knowledge base,
their own past exchanges, what this user told the clone before) are listed at the end of the
system prompt, the best match last, nearest the conversation. Any change to what this module renders must bump
`CONTRACT_VERSION`: adapters record it, and serving refuses one whose version it does not speak.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from training.persona import Persona

CONTRACT_VERSION = 2  # 2: recalled items in the system prompt
QUOTE_CHARS = 80  # a quoted message is cut to this many characters
# <|im_start|> role \n ... <|im_end|> \n around a turn, plus one for merges at its edges.
TURN_OVERHEAD = 6
# Twice what chat text averages per token with SmolLM2's tokenizer (4.1 characters): text cut to
# a token budget times this still holds all the budget can, and costs little to tokenize.
CHARS_PER_TOKEN = 8
# Anything shaped like a chat-template marker ends a generated turn: the model would be starting
# another one. The one end-of-turn rule, for the bots and for `clone serve-model` alike.
TURN_END = re.compile(r"<\|[A-Za-z0-9_]+\|>|</?s>|\[/?INST\]", re.IGNORECASE)
# Tokens of a prompt kept for recalled items, and how many at most; the rest is conversation.
RECALL_TOKENS = 128
RECALL_ITEMS = 4
RECALL_HEADER = "What you know and said before (use it when it answers the message):"


@dataclass(frozen=True, slots=True)
class Utterance:
    """One message (or burst) in a conversation, as the contract sees it."""

    speaker: str         # display name of who said it
    text: str            # may hold line breaks: a burst keeps one message per line
    from_persona: bool   # True for the person being cloned
    quote: str | None = None  # the text it replies to, when that is not what came right before


@dataclass(frozen=True, slots=True)
class Recalled:
    """Something the clone remembers, as the prompt shows it: an answer it gave (`asked` is the
    question), a note in the person's words, or what a user said before (`speaker`)."""

    text: str
    asked: str | None = None
    speaker: str | None = None

    def line(self) -> str:
        text = " ".join(self.text.split())
        if self.asked is not None:
            return f"- Q: {' '.join(self.asked.split())} A: {text}"
        if self.speaker is not None:
            return f"- {self.speaker} told you: {text}"
        return f"- {text}"


def recall_block(recalled: Sequence[Recalled]) -> str:
    """The recalled items as the system prompt lists them; "" when there are none."""
    if not recalled:
        return ""
    return "\n\n" + RECALL_HEADER + "\n" + "\n".join(r.line() for r in recalled)


def without_recall(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Chat messages as a clone without recall sees them: the system prompt's recalled items gone,
    the conversation as it was."""
    system = messages[0]["content"].split("\n\n" + RECALL_HEADER)[0]
    return [{"role": "system", "content": system}, *messages[1:]]


def fit_recalled(
    best_first: Sequence[Recalled], count_tokens: Callable[[str], int], budget: int = RECALL_TOKENS,
    most: int = RECALL_ITEMS,
) -> list[Recalled]:
    """The best items whose block fits `budget` tokens, in prompt order (the best last)."""
    chosen: list[Recalled] = []
    for item in best_first[:most]:
        if count_tokens(recall_block([*chosen, item])) <= budget:
            chosen.append(item)
    return chosen[::-1]


def system_prompt(persona: Persona, recalled: Sequence[Recalled] = ()) -> str:
    about = persona.description.rstrip()
    if about and about[-1] not in ".!?":
        about += "."
    about = f" {about}" if about else ""
    return (
        f"You are {persona.name}.{about} Reply in this chat the way {persona.name} texts: "
        f"same length, tone and habits. Each line you write is sent as a separate message."
    ) + recall_block(recalled)


def render_other(u: Utterance, group: bool) -> str:
    """Someone else's message: named in group chats, with a short quote when it replies upthread."""
    text = f"{u.speaker}: {u.text}" if group else u.text
    if u.quote:
        quote = u.quote.replace("\n", " ")
        if len(quote) > QUOTE_CHARS:
            quote = quote[: QUOTE_CHARS - 1] + "…"
        text = f"> {quote}\n{text}"
    return text


def to_chat_messages(
    persona: Persona, utterances: Sequence[Utterance], group: bool = False,
    recalled: Sequence[Recalled] = (),
) -> list[dict[str, str]]:
    """System prompt, then user/assistant turns; consecutive utterances of one side merge into a turn."""
    messages = [{"role": "system", "content": system_prompt(persona, recalled)}]
    for u in utterances:
        role = "assistant" if u.from_persona else "user"
        content = u.text if u.from_persona else render_other(u, group)
        if messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + content
        else:
            messages.append({"role": role, "content": content})
    return messages


def turn_text(generated: str) -> str:
    """The generated text up to where the turn ends (the first template marker), if it does."""
    end = TURN_END.search(generated)
    return generated[: end.start()] if end else generated


def keep_end(text: str, max_chars: int) -> str:
    """`text`, or when it is longer than `max_chars`, an ellipsis and its last characters. The
    start goes: a message's end (its question, its latest words) is what a reply answers, as the
    latest turns are what a conversation keeps."""
    if len(text) <= max_chars:
        return text
    return "…" + text[len(text) - max_chars + 1 :] if max_chars > 0 else ""


def keep_end_within(text: str, count_tokens: Callable[[str], int], max_tokens: int) -> str:
    """The end of `text` (as `keep_end` cuts it) that counts at most `max_tokens` tokens. Cut by
    characters first, so even a megabyte of text is tokenized only a few thousand characters at a
    time."""
    text = keep_end(text, max(0, max_tokens) * CHARS_PER_TOKEN)
    while text and (tokens := count_tokens(text)) > max_tokens:
        text = keep_end(text, min(len(text) - 1, len(text) * max_tokens // tokens))
    return text


def turn_tokens(content: str, count_tokens: Callable[[str], int]) -> int:
    """What one turn of the chat template costs in tokens: its text and its markers."""
    return count_tokens(content) + TURN_OVERHEAD


def prompt_tokens(messages: Sequence[dict[str, str]], count_tokens: Callable[[str], int]) -> int:
    """What chat-template messages cost in tokens, as the dataset's budget and serving count it."""
    return sum(turn_tokens(m["content"], count_tokens) for m in messages)
