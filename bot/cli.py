"""The `clone` command: one entry point for every job, from importing chats to serving the bot.

Each subcommand is a thin handler; the work lives in `training/` and `bot/`. Heavy imports
(transformers, torch) happen inside handlers so `clone --help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from training.message import ExportError, ImportReport, Message
from training.persona import Persona, PersonaError

log = logging.getLogger("clone")
REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_PERSONA = REPO_ROOT / "persona_data" / "sample"


class CliError(Exception):
    """A problem the user can fix: printed as one line, exit status 2."""


# -- shared pieces ---------------------------------------------------------------------------


class Tally:
    """Chats and authors seen while messages stream past, for the summary."""

    def __init__(self) -> None:
        self.chats: set[tuple[str, str]] = set()
        self.authors: Counter[tuple[str, str]] = Counter()
        self.count = 0

    def watch(self, messages: Iterable[Message]) -> Iterator[Message]:
        from tqdm import tqdm

        for m in tqdm(messages, desc="Importing", unit=" msg", disable=None, leave=False):
            self.count += 1
            self.chats.add((m.platform, m.chat_id))
            self.authors[(m.author_id or "?", m.author or "?")] += 1
            yield m


def print_summary(tally: Tally, report: ImportReport, top: int = 15) -> None:
    formats = Counter(fmt for _, fmt in report.files)
    print(
        f"Imported {tally.count:,} messages in {len(tally.chats):,} chats from "
        f"{len(report.files)} file(s) ({', '.join(f'{f}: {n}' for f, n in sorted(formats.items()))})"
    )
    print("Authors by message count (pass the one that is you as --me):")
    for (author_id, author), n in tally.authors.most_common(top):
        owner = "   <- owner of the export" if author_id in report.owners else ""
        ident = author if author_id == author else f"{author}  [{author_id}]"
        print(f"  {n:>8,}  {ident}{owner}")
    if len(tally.authors) > top:
        print(f"  ... and {len(tally.authors) - top:,} more")
    if report.skipped:
        items = ", ".join(f"{reason}: {n:,}" for reason, n in report.skipped.most_common())
        print(f"Skipped: {items}")
    for note in report.notes:
        print(f"Note: {note}")


def load_persona(folder: Path | None) -> Persona | None:
    if folder is None:
        return None
    try:
        return Persona.load(folder)
    except PersonaError as e:
        raise CliError(str(e)) from None


# -- clone import --------------------------------------------------------------------------


def cmd_import(args: argparse.Namespace) -> None:
    from training.atomic import atomic_file
    from training.importers import import_messages

    report = ImportReport()
    tally = Tally()
    with atomic_file(args.out) as f:
        for m in tally.watch(import_messages(args.paths, report, args.format)):
            f.write(m.to_json() + "\n")
    print_summary(tally, report)
    print(f"Wrote {args.out}")


# -- clone prepare -------------------------------------------------------------------------


def resolve_me(args: argparse.Namespace, persona: Persona | None, report: ImportReport) -> list[str]:
    """Who the person is: --me, else the persona's settings, else the export's own owner."""
    if args.me:
        return list(args.me)
    if persona and persona.me:
        return list(persona.me)
    if report.owners:
        print(f"Using the export's owner as you: {', '.join(sorted(report.owners.values()))}")
        return list(report.owners)
    raise CliError("who are you in these chats? pass --me NAME_OR_ID (see `clone import`'s author list)")


def prepare(
    paths: list[Path],
    persona: Persona | None,
    args: argparse.Namespace,
) -> Path:
    from training import dataset
    from training.base_model import load_tokenizer
    from training.importers import import_messages
    from training.privacy import load_blocklist

    report = ImportReport()
    tally = Tally()
    messages = list(tally.watch(import_messages(paths, report, args.format)))
    print_summary(tally, report)
    me = resolve_me(args, persona, report)
    # The persona's display name: --name, else the name behind the first --me that matches.
    names = None
    for key in me:
        matcher = dataset.PersonMatcher([key])
        names = Counter(m.author or m.author_id for m in messages if matcher(m))
        if names:
            break
    if not names:
        raise CliError(f"no message in these exports is from {', '.join(me)}: check --me")
    if persona is None:
        persona = Persona(name=args.name or names.most_common(1)[0][0], me=tuple(me))
    blocklist = list(persona.blocklist)
    if args.blocklist:
        blocklist += load_blocklist(args.blocklist)
    persona = Persona(persona.name, persona.description, tuple(me), tuple(blocklist), persona.root)

    tokenizer = load_tokenizer(args.tokenizer)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    cfg = dataset.PrepareConfig(
        me=me,
        gap_minutes=args.gap_minutes,
        max_tokens=args.max_tokens,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    prepared = dataset.build(messages, persona, cfg, count_tokens, report)
    out = args.out or (persona.dataset if persona.root else Path("dataset"))
    dataset.write(prepared, out)
    card = prepared.card
    print(
        f"Dataset for {persona.name}: {card.samples['train']:,} train / {card.samples['val']:,} val "
        f"samples from {card.conversations['train'] + card.conversations['val']:,} conversations "
        f"({card.tokens['train'] + card.tokens['val']:,} tokens)"
    )
    dropped = {k: v for k, v in card.skipped.items() if k != "at_import" and v}
    if dropped:
        print("Filtered: " + ", ".join(f"{k}: {v:,}" for k, v in dropped.items()))
    redacted = ", ".join(f"{k}: {v:,}" for k, v in card.redactions.items()) or "nothing found"
    print(f"Redacted: {redacted}")
    print(f"Wrote {out}/train.jsonl, val.jsonl, card.json (fingerprint {card.fingerprint[:19]}…)")
    return out


def cmd_prepare(args: argparse.Namespace) -> None:
    persona = load_persona(args.persona)
    paths = args.paths or ([persona.exports] if persona and persona.exports else [])
    if not paths:
        raise CliError("nothing to prepare: give export files or folders, or --persona DIR")
    prepare(paths, persona, args)


# -- clone start: the main job ---------------------------------------------------------------


def cmd_start(args: argparse.Namespace) -> None:
    """Everything a fresh machine needs, on the persona's own data (the sample by default)."""
    persona = load_persona(args.persona)
    assert persona is not None and persona.exports is not None
    print(f"Persona: {persona.name} ({args.persona})")
    prepare([persona.exports], persona, args)


# -- argument parsing ------------------------------------------------------------------------


def add_prepare_options(p: argparse.ArgumentParser, formats: tuple[str, ...]) -> None:
    p.add_argument("--me", action="append", metavar="NAME_OR_ID",
                   help="an author name or id that is you (repeat for each platform)")
    p.add_argument("--name", help="the persona's display name (default: your most used name)")
    p.add_argument("--out", type=Path, help="dataset folder (default: the persona's dataset/)")
    p.add_argument("--blocklist", type=Path, help="file of words and names to redact, one per line")
    p.add_argument("--format", choices=formats, help="force a format instead of detecting it")
    p.add_argument("--tokenizer", help="tokenizer for the token budget (default: the base model's)")
    p.add_argument("--max-tokens", type=int, default=1024, help="token budget of one sample")
    p.add_argument("--gap-minutes", type=float, default=120.0,
                   help="silence that ends a conversation")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    from training.importers import FORMATS

    parser = argparse.ArgumentParser(prog="clone", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="read chat exports into normalized messages (JSONL)")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--out", type=Path, default=Path("messages.jsonl"))
    p.add_argument("--format", choices=FORMATS, help="force a format instead of detecting it")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("prepare", help="build the private training dataset from exports")
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH")
    p.add_argument("--persona", type=Path, help="persona folder with persona.toml (and exports/)")
    add_prepare_options(p, FORMATS)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("start", help="the main job: set the persona up end to end")
    p.add_argument("--persona", type=Path, default=SAMPLE_PERSONA)
    add_prepare_options(p, FORMATS)
    p.set_defaults(func=cmd_start)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
    except (CliError, ExportError, PersonaError) as e:
        print(f"clone {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was overwritten", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
