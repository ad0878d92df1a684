"""One prepare for every command: a persona's exports to its private dataset folder.

import (streamed, counted per chat and author) -> who the person is (--me, else persona.toml's
`me`, else the export's owner) -> build the samples (training.dataset) -> refuse an empty result
-> the persona index (knowledge facts and notes, the person's exchanges), and each sample's
recalled items from it -> the owner's corrections as samples and preference pairs (with the
items their replies drew on) -> write the dataset folder and its index atomically. `clone prepare`,
`start` and `retrain`, and the benchmarks, all come through here.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from training import corrections as corrections_store
from training import dataset, feedback, index, knowledge
from training.config import PrepareConfig
from training.importers.tables import QA_ANSWERER
from training.message import ImportReport, Message
from training.persona import Persona
from training.privacy import Redactor


class PrepareError(ValueError):
    """Nothing usable to prepare; the message says what to change. Nothing was written."""


@dataclass
class ImportTally:
    """Chats and authors seen while messages stream past, for the summary a user reads."""

    chats: set[tuple[str, str]] = field(default_factory=set)
    authors: Counter[tuple[str, str]] = field(default_factory=Counter)
    count: int = 0

    def watch(self, messages: Iterable[Message]) -> Iterator[Message]:
        from tqdm import tqdm

        for m in tqdm(messages, desc="Importing", unit=" msg", disable=None, leave=False):
            self.count += 1
            self.chats.add((m.platform, m.chat_id))
            self.authors[(m.author_id or "?", m.author or "?")] += 1
            yield m


@dataclass
class Outcome:
    prepared: dataset.Prepared
    report: ImportReport
    tally: ImportTally
    me: list[str]
    me_guessed: str | None  # nobody said who the person is: whom prepare took (who_is_me)
    out: Path


def who_is_me(me: Sequence[str], persona: Persona, report: ImportReport,
              tally: ImportTally) -> tuple[list[str], str | None]:
    """The person's author names or ids, and how they were guessed when nobody said (None when
    `me` or persona.toml did): a chat export's owner, else the one author named as the persona,
    else a question/answer table's answerer. A table's answers are the person's whoever `me` is
    (dataset.PersonMatcher), so its answerer says nothing of who the person is in the chats."""
    if me:
        return list(me), None
    if persona.me:
        return list(persona.me), None
    chat_owners = [owner for owner in report.owners if owner != QA_ANSWERER]
    if chat_owners:
        return chat_owners, "the export's owner"
    wanted = persona.name.strip().casefold()  # as dataset.PersonMatcher compares names
    named = {author if author_id == "?" else author_id  # an author without an id: by name
             for author_id, author in tally.authors if author.strip().casefold() == wanted}
    if len(named) == 1:
        return list(named), f"the author named {persona.name}"
    if report.owners:  # a question/answer table alone
        return list(report.owners), "the export's owner"
    raise PrepareError(
        "who are you in these chats? set `me` in persona.toml or pass --me NAME_OR_ID "
        "(`clone import PATH` lists the authors)")


def check_me_present(messages: list[Message], me: list[str]) -> None:
    matcher = dataset.PersonMatcher(me)
    if not any(matcher(m) for m in messages):
        raise PrepareError(f"no message in these exports is from {', '.join(me)}: check `me` / --me")


def prepare(
    paths: Sequence[Path], persona: Persona, cfg: PrepareConfig, count_tokens: Callable[[str], int],
    *, fmt: str | None = None, blocklist: Sequence[str] = (), tally: ImportTally | None = None,
    report: ImportReport | None = None, embedder: index.TextEmbedder | None = None,
    corrections: Sequence[dict] | None = None,
) -> Outcome:
    """Import `paths`, build the samples and write them to the persona's dataset folder. An
    empty result raises PrepareError and the dataset already there stays as it was.
    `corrections` default to the persona's own corrections.jsonl."""
    from training.importers import import_messages

    assert persona.dataset is not None, "a persona loaded from its folder"
    report, tally = report or ImportReport(), tally or ImportTally()
    messages = list(tally.watch(import_messages(list(paths), report, fmt)))
    me, guessed = who_is_me(cfg.me, persona, report, tally)
    check_me_present(messages, me)
    persona = dataclasses.replace(persona, me=tuple(me), blocklist=(*persona.blocklist, *blocklist))
    prepared = dataset.build(messages, persona, dataclasses.replace(cfg, me=me), count_tokens, report)
    if not prepared.train:
        raise PrepareError(
            f"these exports give no training sample of {persona.name} answering someone "
            f"({prepared.card.messages.get('persona', 0)} of their messages kept): "
            f"nothing written, {persona.dataset} is unchanged")
    built = index_persona(prepared, persona, count_tokens, cfg.recall_tokens, embedder)
    if corrections is None:
        corrections = persona_corrections(persona)
    if corrections:
        fed = feedback.from_corrections(corrections, persona, count_tokens, cfg.max_tokens)
        dataset.add_feedback(prepared, fed)
    dataset.write(prepared, persona.dataset, built)
    return Outcome(prepared, report, tally, me, guessed, persona.dataset)


def persona_corrections(persona: Persona) -> list[dict]:
    """The owner's corrections stored in the persona's folder (none for a persona without one)."""
    return corrections_store.load(corrections_store.corrections_file(persona.root)) if persona.root else []


def index_persona(
    prepared: dataset.Prepared, persona: Persona, count_tokens: Callable[[str], int], budget: int,
    embedder: index.TextEmbedder | None = None,
) -> index.PersonaIndex:
    """The persona index (the prepared facts and exchanges, the knowledge notes), and every
    sample's recalled items from it; the card records the index."""
    if embedder is None:
        from training.embed import Embedder

        embedder = Embedder()
    notes = knowledge.notes(persona.knowledge, Redactor(persona.blocklist))
    built = index.build([*prepared.items, *notes], embedder, progress=True)
    samples = [*prepared.train, *prepared.val]
    index.attach_recalled(samples, built, embedder, persona, count_tokens, budget)
    asks = index.paraphrase_samples(prepared.train, built, embedder, persona, count_tokens, budget)
    prepared.train += asks
    card = prepared.card
    card.samples["train"] = len(prepared.train)
    card.index = {"embedding_model": built.model, "items": len(built), "kinds": built.kinds(),
                  "fingerprint": built.fingerprint, "paraphrase_samples": len(asks)}
    card.fingerprint = dataset.fingerprint(prepared.train, prepared.val)
    return built


def prepare_persona(persona: Persona, count_tokens: Callable[[str], int]) -> Outcome:
    """Everything in the persona's exports/ into its dataset, with its own settings (benchmarks)."""
    assert persona.exports is not None
    return prepare([persona.exports], persona, PrepareConfig(me=list(persona.me)), count_tokens)
