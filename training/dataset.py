"""From normalized messages to a private training dataset: train.jsonl, val.jsonl and card.json.

Read top to bottom, this is the whole pipeline:
  1. filter      drop service messages, media without text, empties, over-long messages
  2. dedupe      exact (same message id, so re-imports and overlapping exports change nothing)
                 and near (the same text sent again by the same author)
  3. redact      personal data replaced in place by typed placeholders
  4. converse    per chat, in time order, split at a silence gap unless a reply links across it
  5. window      each conversation cut into multi-turn samples that fit a token budget
  6. split       train/validation by conversation, deterministic for a seed
  7. recallable  the knowledge base's facts and the training conversations' exchanges, as
                 items for the persona index (training.index embeds them and gives every
                 sample what serving would recall for it)
  8. corrected   the owner's corrections (training.feedback) join the training split as samples,
                 their preference pairs beside it (added by training.prepare, after the index)
  9. write       into a staging folder, renamed into place only when complete
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from training.atomic import staged_dir
from training.config import PrepareConfig  # re-exported: its home was here
from training.feedback import Feedback
from training.importers.tables import PLATFORM as TABLE_PLATFORM
from training.importers.tables import QA_ANSWERER, QA_ASKER
from training.knowledge import Item, exchanges
from training.message import ImportReport, Message
from training.persona import Persona
from training.privacy import Redactor
from training.prompt import CONTRACT_VERSION, Utterance, prompt_tokens, to_chat_messages, turn_tokens

TokenCounter = Callable[[str], int]
PAIRS_FILE = "preferences.jsonl"  # preference pairs from corrections, TRL's conversational format
NEAR_DUP_MIN_CHARS = 16  # "ok" and "lol" again are how a person texts, not duplicates


@dataclass
class DatasetCard:
    persona: str
    contract_version: int
    settings: dict
    sources: list[dict]
    messages: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    conversations: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    date_range: dict = field(default_factory=dict)
    redactions: dict = field(default_factory=dict)
    index: dict | None = None  # the persona index: embedding model, item counts, fingerprint
    corrections: dict | None = None  # the owner's corrections trained on: counts only (training.feedback)
    fingerprint: str = ""


@dataclass
class Conversation:
    key: str
    group: bool
    messages: list[Message]


def _utc(ts: datetime) -> datetime:
    """A comparable instant: aware times in UTC; naive (local) ones taken as they are."""
    return ts.astimezone(UTC).replace(tzinfo=None) if ts.tzinfo else ts


def _near_key(text: str) -> str:
    """Text with case, accents, punctuation and spacing folded away: what 'the same message' means."""
    folded = unicodedata.normalize("NFKD", text.casefold())
    return re.sub(r"[\W_]+", " ", folded).strip()


class PersonMatcher:
    """Is this author the person? Matches ids exactly and names without case."""

    def __init__(self, me: Iterable[str]) -> None:
        self.keys = {m.strip().casefold() for m in me if m.strip()}

    def __call__(self, m: Message) -> bool:
        if m.platform == TABLE_PLATFORM and m.author_id == QA_ANSWERER:
            return True  # a question/answer table's answers are the person's, whoever `me` is
        return any(
            v is not None and v.strip().casefold() in self.keys for v in (m.author_id, m.author)
        )


# -- 1 and 2: filter and dedupe ------------------------------------------------------------


def clean(
    messages: Iterable[Message], cfg: PrepareConfig, skipped: Counter[str]
) -> dict[tuple[str, str], list[Message]]:
    """Usable messages grouped by chat, each chat in time order, duplicates gone."""
    seen_ids: set[tuple[str, str, str]] = set()
    chats: dict[tuple[str, str], list[Message]] = defaultdict(list)
    order: dict[tuple[str, str, str], int] = {}
    for m in messages:
        key = (m.platform, m.chat_id, m.id)
        if key in seen_ids:
            skipped["duplicate"] += 1
            continue
        seen_ids.add(key)
        text = m.text.strip()
        if m.kind == "service":
            skipped["service message"] += 1
        elif not text:
            skipped["media without text" if m.kind == "media" else "empty"] += 1
        elif len(text) > cfg.max_chars:
            skipped["too long"] += 1
        else:
            order[key] = len(order)
            chats[(m.platform, m.chat_id)].append(m)

    def when(m: Message) -> tuple:
        # Exports are not always sorted (WhatsApp's clock jumps); sources without times keep file order.
        at = _utc(m.timestamp) if m.timestamp else datetime.min
        return (at, order[(m.platform, m.chat_id, m.id)])

    window = timedelta(minutes=cfg.near_dup_minutes)
    for chat, msgs in chats.items():
        msgs.sort(key=when)
        last_seen: dict[tuple[str | None, str], datetime | None] = {}
        kept = []
        for m in msgs:
            k = (m.author_id or m.author, _near_key(m.text))
            at = _utc(m.timestamp) if m.timestamp else None
            if k in last_seen and len(k[1]) >= NEAR_DUP_MIN_CHARS:
                prev = last_seen[k]
                if at is None or prev is None or at - prev <= window:
                    skipped["near duplicate"] += 1
                    continue
            last_seen[k] = at
            kept.append(m)
        chats[chat] = kept
    return chats


# -- 3: redact -----------------------------------------------------------------------------


def redact_all(
    chats: dict[tuple[str, str], list[Message]], redactor: Redactor, counts: Counter[str]
) -> None:
    """Replace every message's text and author name by their redacted forms, in place."""
    for chat, msgs in chats.items():
        out = []
        for m in msgs:
            text, c = redactor.redact(m.text)
            counts.update(c)
            author = m.author
            if author:
                author, c = redactor.redact(author)
                counts.update(c)
            out.append(replace(m, text=text, author=author))
        chats[chat] = out


# -- 4: conversations ----------------------------------------------------------------------


def conversations(
    chats: dict[tuple[str, str], list[Message]], cfg: PrepareConfig
) -> list[Conversation]:
    """Split each chat at silences, except where a message replies to one before the silence."""
    gap = timedelta(minutes=cfg.gap_minutes)
    out: list[Conversation] = []
    for (platform, chat_id), msgs in sorted(chats.items()):
        group = len({m.author_id or m.author for m in msgs}) > 2
        current: list[Message] = []
        ids: set[str] = set()
        for m in msgs:
            if current and m.timestamp and current[-1].timestamp:
                silent = _utc(m.timestamp) - _utc(current[-1].timestamp) > gap
                if silent and m.reply_to not in ids:
                    out.append(Conversation(f"{platform}:{chat_id}:{current[0].id}", group, current))
                    current, ids = [], set()
            current.append(m)
            ids.add(m.id)
        if current:
            out.append(Conversation(f"{platform}:{chat_id}:{current[0].id}", group, current))
    return out


def utterances(conv: Conversation, is_me: PersonMatcher) -> list[Utterance]:
    """The conversation as the prompt contract sees it, quoting replies that point upthread."""
    by_id = {m.id: m for m in conv.messages}
    out: list[Utterance] = []
    for i, m in enumerate(conv.messages):
        mine = is_me(m)
        quote = None
        target = by_id.get(m.reply_to) if m.reply_to else None
        # Quote only what is not already right above, and only for others' lines: the clone
        # should learn to answer quotes, not to write them.
        if target is not None and not mine and (i == 0 or conv.messages[i - 1].id != target.id):
            quote = target.text
        out.append(Utterance(m.author or m.author_id or "someone", m.text, mine, quote))
    return out


# -- 5: windows ----------------------------------------------------------------------------


def _runs(utts: list[Utterance]) -> list[list[Utterance]]:
    """Consecutive utterances of one side: what becomes one chat-template turn."""
    runs: list[list[Utterance]] = []
    for u in utts:
        if runs and runs[-1][0].from_persona == u.from_persona:
            runs[-1].append(u)
        else:
            runs.append([u])
    return runs


def windows(
    utts: list[Utterance],
    cost: Callable[[list[Utterance]], int],
    budget: int,
    skipped: Counter[str],
) -> list[list[Utterance]]:
    """Cut a conversation into samples that fit `budget` tokens and end with the person's turn.

    A turn too big for one sample is split between its messages into pieces that go to
    separate samples; the other side's last turn is carried into the next sample as context.
    """
    pieces: list[tuple[list[Utterance], int]] = []
    for run in _runs(utts):
        # The first piece of a long turn leaves room for what it answers, when that is short.
        context = pieces[-1][1] if pieces and pieces[-1][1] <= budget // 2 else 0
        limit = budget - context
        piece: list[Utterance] = []
        for u in run:
            if cost([u]) > budget:
                skipped["over the token budget"] += 1
                continue
            if piece and cost([*piece, u]) > limit:
                pieces.append((piece, cost(piece)))
                piece, limit = [], budget
            piece.append(u)
        if piece:
            pieces.append((piece, cost(piece)))

    out: list[list[Utterance]] = []
    current: list[tuple[list[Utterance], int]] = []

    def flush() -> None:
        while current and not current[-1][0][0].from_persona:
            current.pop()  # a sample ends with the person's turn
        if current:
            out.append([u for piece, _ in current for u in piece])

    used = 0
    for piece, tokens in pieces:
        same_side = bool(current) and current[-1][0][0].from_persona == piece[0].from_persona
        if current and (used + tokens > budget or same_side):
            context = current[-1]
            flush()
            current.clear()
            used = 0
            carry = not context[0][0].from_persona and piece[0].from_persona
            if carry and context[1] + tokens <= budget:
                current.append(context)
                used = context[1]
        current.append((piece, tokens))
        used += tokens
    flush()
    return out


# -- 6: split ------------------------------------------------------------------------------


def _unit(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split(keys: Sequence[str], fraction: float, seed: int) -> set[str]:
    """Validation conversation keys: a stable hash decides, so adding data moves nothing else."""
    val = {k for k in keys if _unit(seed, k) < fraction}
    if not val and len(keys) >= 2 and fraction > 0:
        val = {min(keys, key=lambda k: _unit(seed, k))}
    if len(val) == len(keys) and len(keys) >= 2:
        val.discard(max(val, key=lambda k: _unit(seed, k)))
    return val


# -- the whole pipeline ----------------------------------------------------------------------


@dataclass
class Prepared:
    train: list[dict]
    val: list[dict]
    card: DatasetCard
    items: list[Item] = field(default_factory=list)  # what the persona index is built from
    pairs: list[dict] = field(default_factory=list)  # preference pairs from the owner's corrections


class _Windower:
    """Step 5 for one persona: conversations into samples that fit the token budget."""

    def __init__(self, persona: Persona, cfg: PrepareConfig, count_tokens: TokenCounter) -> None:
        self.persona = persona
        self.count = functools.lru_cache(maxsize=65536)(count_tokens)
        self.system_cost = turn_tokens(to_chat_messages(persona, [])[0]["content"], self.count)
        # Recalled items join the system prompt later (training.index): their room is kept.
        self.budget = cfg.max_tokens - self.system_cost - cfg.recall_tokens

    def cost(self, piece: list[Utterance], group: bool) -> int:
        return turn_tokens(to_chat_messages(self.persona, piece, group)[1]["content"], self.count)

    def samples(
        self, utts: list[Utterance], conv: Conversation, skipped: Counter[str]
    ) -> list[tuple[dict, int]]:
        """Each sample of one conversation with its token count."""
        cost = functools.partial(self.cost, group=conv.group)
        out = []
        for w in windows(utts, cost, self.budget, skipped):
            sample = {"messages": to_chat_messages(self.persona, w, conv.group), "conversation": conv.key}
            if is_knowledge(conv):
                sample["knowledge"] = True
            tokens = self.system_cost + prompt_tokens(sample["messages"][1:], self.count)
            out.append((sample, tokens))
        return out


@dataclass
class _Tally:
    """The samples of every conversation, and the counts the card reports about them."""

    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)
    first: datetime | None = None
    last: datetime | None = None

    def add(
        self, conv: Conversation, utts: list[Utterance], side: str, samples: list[tuple[dict, int]]
    ) -> None:
        self.stats[f"conversations_{side}"] += 1
        self.stats["persona_messages"] += sum(u.from_persona for u in utts)
        self.stats["other_messages"] += sum(not u.from_persona for u in utts)
        for m in conv.messages:
            if m.timestamp:
                first, last = self.first, self.last
                self.first = m.timestamp if first is None or _utc(m.timestamp) < _utc(first) else first
                self.last = m.timestamp if last is None or _utc(m.timestamp) > _utc(last) else last
        for sample, tokens in samples:
            (self.val if side == "val" else self.train).append(sample)
            self.stats[f"tokens_{side}"] += tokens


def sample_all(
    convs: list[Conversation],
    persona: Persona,
    cfg: PrepareConfig,
    count_tokens: TokenCounter,
    skipped: Counter[str],
) -> _Tally:
    """Steps 5 and 6: every conversation with the person in it, windowed into its split."""
    is_me = PersonMatcher(cfg.me)
    windower = _Windower(persona, cfg, count_tokens)
    val_keys = split([c.key for c in convs], cfg.val_fraction, cfg.seed)
    tally = _Tally()
    for conv in convs:
        utts = utterances(conv, is_me)
        if not any(u.from_persona for u in utts):
            skipped["message in a conversation without the person"] += len(utts)
            continue
        side = "val" if conv.key in val_keys else "train"
        tally.add(conv, utts, side, windower.samples(utts, conv, skipped))
        tally.items.extend(recallable(conv, utts, side))
    return tally


def is_knowledge(conv: Conversation) -> bool:
    """A question/answer table's row: the person's knowledge base, not a chat."""
    return conv.messages[0].platform == TABLE_PLATFORM and any(m.author_id == QA_ASKER for m in conv.messages)


def recallable(conv: Conversation, utts: list[Utterance], side: str) -> list[Item]:
    """Step 7: the knowledge base's facts, whatever their split (the clone should know them all),
    and the person's exchanges of training conversations (validation measures what they add)."""
    if is_knowledge(conv):
        return list(exchanges(utts, conv.key, kind="fact"))
    return list(exchanges(utts, conv.key)) if side == "train" else []


def _card(
    persona: Persona,
    cfg: PrepareConfig,
    report: ImportReport,
    read: int,
    tally: _Tally,
    skipped: Counter[str],
    redactions: Counter[str],
) -> DatasetCard:
    stats = tally.stats
    card = DatasetCard(
        persona=persona.name,
        contract_version=CONTRACT_VERSION,
        settings={k: v for k, v in asdict(cfg).items() if k != "me"},
        sources=[{"file": Path(p).name, "format": f} for p, f in report.files],
        messages={
            "read": read,
            "used": stats["persona_messages"] + stats["other_messages"],
            "persona": stats["persona_messages"],
            "others": stats["other_messages"],
        },
        skipped={"at_import": dict(sorted(report.skipped.items())), **dict(sorted(skipped.items()))},
        conversations={
            "train": stats["conversations_train"],
            "val": stats["conversations_val"],
        },
        samples={"train": len(tally.train), "val": len(tally.val)},
        tokens={"train": stats["tokens_train"], "val": stats["tokens_val"]},
        date_range={
            "first": tally.first.isoformat() if tally.first else None,
            "last": tally.last.isoformat() if tally.last else None,
        },
        redactions=dict(sorted(redactions.items())),
    )
    card.fingerprint = fingerprint(tally.train, tally.val)
    return card


def build(
    messages: Iterable[Message],
    persona: Persona,
    cfg: PrepareConfig,
    count_tokens: TokenCounter,
    report: ImportReport | None = None,
) -> Prepared:
    """Run steps 1 to 6 in memory and return the samples with their card."""
    report = report or ImportReport()
    skipped: Counter[str] = Counter()
    read = 0

    def counted(ms: Iterable[Message]) -> Iterable[Message]:
        nonlocal read
        for m in ms:
            read += 1
            yield m

    chats = clean(counted(messages), cfg, skipped)
    redactions: Counter[str] = Counter()
    redact_all(chats, Redactor(persona.blocklist), redactions)
    tally = sample_all(conversations(chats, cfg), persona, cfg, count_tokens, skipped)
    card = _card(persona, cfg, report, read, tally, skipped, redactions)
    return Prepared(tally.train, tally.val, card, tally.items)


def _jsonl(samples: list[dict]) -> str:
    return "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)


def fingerprint(train: list[dict], val: list[dict], pairs: list[dict] | None = None) -> str:
    h = hashlib.sha256()
    h.update(_jsonl(train).encode("utf-8"))
    h.update(b"\x00")
    h.update(_jsonl(val).encode("utf-8"))
    if pairs:  # hashed only when there are some: a dataset without corrections keeps its fingerprint
        h.update(b"\x00")
        h.update(_jsonl(pairs).encode("utf-8"))
    return "sha256:" + h.hexdigest()


def add_feedback(prepared: Prepared, feedback: Feedback) -> None:
    """The owner's corrections join the training split (samples; their pairs beside it), after
    the persona index gave the chats their recalled items: a correction keeps what its reply
    really drew on. The card counts them; their redactions join the chats'."""
    card = prepared.card
    prepared.train.extend(feedback.samples)
    prepared.pairs = list(feedback.pairs)
    card.samples["train"] = len(prepared.train)
    card.corrections = feedback.card()
    card.redactions = dict(sorted((Counter(card.redactions) + feedback.redactions).items()))
    card.fingerprint = fingerprint(prepared.train, prepared.val, prepared.pairs)


def write(prepared: Prepared, out: Path, index=None) -> None:
    """Write the dataset folder atomically: its files and the persona index (a
    training.index.PersonaIndex, when given) appear together, or nothing changes."""
    with staged_dir(out) as tmp:
        if index is not None:
            index.save(tmp / "index")
        (tmp / "train.jsonl").write_text(_jsonl(prepared.train), encoding="utf-8")
        (tmp / "val.jsonl").write_text(_jsonl(prepared.val), encoding="utf-8")
        if prepared.pairs:
            (tmp / PAIRS_FILE).write_text(_jsonl(prepared.pairs), encoding="utf-8")
        card = json.dumps(asdict(prepared.card), ensure_ascii=False, indent=2) + "\n"
        (tmp / "card.json").write_text(card, encoding="utf-8")
