"""`clone init`, `clone import`, `clone prepare`: from exports to a persona's dataset."""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from cli.common import CliError, Session, open_session, shown, using
from cli.options import HelpFormatter, add_config_options, add_persona_option, config_values
from cli.settings import load_settings
from training.config import PrepareConfig
from training.message import ImportReport
from training.persona import PERSONAS, create_persona, names_a_path
from training.prepare import ImportTally, Outcome

PREPARE_FIELDS = ["gap_minutes", "max_tokens", "val_fraction", "seed"]


def print_summary(tally: ImportTally, report: ImportReport, top: int = 15) -> None:
    formats = Counter(fmt for _, fmt in report.files)
    print(
        f"Imported {tally.count:,} messages in {len(tally.chats):,} chats from "
        f"{len(report.files)} file(s) ({', '.join(f'{f}: {n}' for f, n in sorted(formats.items()))})"
    )
    print("Authors by message count (the one that is you goes in persona.toml's `me`, or --me):")
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


# -- clone init -------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> None:
    """A new persona folder: persona.toml, exports/ (with copies of the given exports)."""
    settings = load_settings(Path(".env"))
    given = Path(args.folder).expanduser()
    folder = given if names_a_path(args.folder) else (settings.clone_personas or PERSONAS) / args.folder
    persona = create_persona(folder, args.name or folder.name, args.me or [], args.description or "",
                             args.exports)
    print(f"Created persona {persona.name} [{persona.id}] in {shown(folder)} "
          f"({len(args.exports or [])} export(s) copied)")
    hint = "" if args.me else ("; set `me` in persona.toml (`clone import` lists who is who), "
                               "unless the persona's name is yours in the chats")
    again = args.folder if names_a_path(args.folder) else folder.name
    print(f"Next: `clone prepare --persona {again}`{hint}")


# -- clone import -----------------------------------------------------------------------------


def cmd_import(args: argparse.Namespace) -> None:
    from training.atomic import atomic_file
    from training.importers import import_messages

    if args.out is not None and args.out.exists() and not args.out.is_file():
        # The output is written beside and renamed over: that would replace a device or a pipe.
        raise CliError(f"--out {args.out}: not a regular file (give the path of a file to write)")
    report, tally = ImportReport(), ImportTally()
    messages = tally.watch(import_messages(args.paths, report, args.format))
    if args.out is None:
        for _ in messages:
            pass
    else:
        with atomic_file(args.out) as f:
            for m in messages:
                f.write(m.to_json() + "\n")
    print_summary(tally, report)
    if args.out is not None:
        print(f"Wrote {args.out}")


# -- clone prepare ----------------------------------------------------------------------------


def lazy_token_counter(base: str | None) -> Callable[[str], int]:
    """The tokenizer's counter, loaded at its first use: after the import, so an export that
    cannot be read is said at once, not after the seconds the tokenizer takes to load."""
    counter: Callable[[str], int] | None = None

    def count(text: str) -> int:
        nonlocal counter
        if counter is None:
            from training.base_model import load_tokenizer, token_counter

            counter = token_counter(load_tokenizer(base))
        return counter(text)

    return count


def run_prepare(session: Session, args: argparse.Namespace) -> Outcome:
    """The persona's exports/ to its dataset/, with the summary printed."""
    from training import prepare
    from training.privacy import load_blocklist

    persona = session.persona
    assert persona.exports is not None
    if not persona.exports.is_dir() or not any(persona.exports.iterdir()):
        raise CliError(f"no exports in {shown(persona.exports)}: put your chat exports there "
                       "(`clone import --help` lists the formats)")
    cfg = PrepareConfig(**(config_values(args, PrepareConfig) | {"me": args.me or []}))
    blocklist = load_blocklist(args.blocklist) if args.blocklist else []
    report, tally = ImportReport(), ImportTally()
    try:
        outcome = prepare.prepare([persona.exports], persona, cfg, lazy_token_counter(args.base),
                                  fmt=args.format, blocklist=blocklist, tally=tally, report=report)
    except prepare.PrepareError:
        print_summary(tally, report)  # the author list tells who `me` should be
        raise
    print_summary(tally, report)
    print_prepared(outcome)
    return outcome


def print_prepared(outcome: Outcome) -> None:
    card = outcome.prepared.card
    if outcome.me_guessed:
        print(f"Taking {outcome.me_guessed} as {card.persona}: set `me` in persona.toml to be sure")
    print(
        f"Dataset for {card.persona}: {card.samples['train']:,} train / {card.samples['val']:,} val "
        f"samples from {card.conversations['train'] + card.conversations['val']:,} conversations "
        f"({card.tokens['train'] + card.tokens['val']:,} tokens)"
    )
    dropped = {k: v for k, v in card.skipped.items() if k != "at_import" and v}
    if dropped:
        print("Filtered: " + ", ".join(f"{k}: {v:,}" for k, v in dropped.items()))
    if card.corrections:  # counts only: a correction's words are as private as the chats
        c = card.corrections
        skipped = "".join(f", {reason}: {n}" for reason, n in c["skipped"].items())
        print(f"Corrections: {c['used']} of {c['read']} used ({c['samples']} samples, "
              f"{c['pairs']} preference pairs{skipped})")
    redacted = ", ".join(f"{k}: {v:,}" for k, v in card.redactions.items()) or "nothing found"
    print(f"Redacted: {redacted}")
    pairs = ", preferences.jsonl" if outcome.prepared.pairs else ""
    print(f"Wrote {shown(outcome.out)}/train.jsonl, val.jsonl{pairs}, card.json "
          f"(fingerprint {card.fingerprint[:19]}…)")


def cmd_prepare(args: argparse.Namespace) -> None:
    session = open_session(args)
    using(session.persona, dataset=True)
    run_prepare(session, args)


# -- the parsers --------------------------------------------------------------------------------


def add_prepare_options(p: argparse.ArgumentParser, formats: tuple[str, ...]) -> None:
    p.add_argument("--me", action="append", metavar="NAME_OR_ID",
                   help="an author name or id that is you, repeated for each platform "
                        "(default: persona.toml's `me`, else the export's owner)")
    p.add_argument("--blocklist", type=Path, metavar="FILE",
                   help="more words and names to redact, one per line (beside persona.toml's)")
    p.add_argument("--format", choices=formats, help="read every export as this format (default: detect)")
    add_config_options(p, PrepareConfig, PREPARE_FIELDS)


def register(sub: argparse._SubParsersAction) -> None:
    from training.importers import FORMATS

    p = sub.add_parser("init", help="make a new persona folder (persona.toml and exports/)",
                       formatter_class=HelpFormatter)
    p.add_argument("folder", metavar="NAME_OR_DIR", help="a name (made in persona_data/) or a folder")
    p.add_argument("--name", help="the person's display name (default: the folder's name)")
    p.add_argument("--me", action="append", metavar="NAME_OR_ID",
                   help="your author name or id in the exports")
    p.add_argument("--description", help="one line about the person, for the system prompt")
    p.add_argument("--exports", nargs="+", type=Path, metavar="PATH", help="exports to copy into exports/")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("import", help="read chat exports and list chats and authors (who is who)",
                       formatter_class=HelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="export files or folders")
    p.add_argument("--out", type=Path, metavar="FILE", help="also write the normalized messages here (JSONL)")
    p.add_argument("--format", choices=FORMATS, help="read every export as this format (default: detect)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("prepare", help="build the persona's private training dataset from its exports/",
                       formatter_class=HelpFormatter)
    add_persona_option(p)
    p.add_argument("--base", help="base model whose tokenizer counts the token budget "
                                  "(default: the packaged SmolLM2-135M-Instruct)")
    add_prepare_options(p, FORMATS)
    p.set_defaults(func=cmd_prepare)
