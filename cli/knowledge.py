"""`clone knowledge list|add|search|reindex`: the notes a clone recalls, edited without retraining.

Notes are `.md` / `.txt` files in the persona's `knowledge/` folder. Adding or editing one
re-indexes the notes of every index of the persona (the dataset's and each adapter's), keeping
the vectors of everything unchanged; a running `clone serve` picks the new index up within
seconds. The question/answer table in `exports/` is trained on, so it changes with `clone
retrain`.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from cli.common import CliError, Session, open_session, shown, using
from cli.options import HelpFormatter, add_persona_option


def _embedder():
    from training.embed import Embedder

    return Embedder()


def reindex_all(session: Session, embedder=None) -> None:
    from training import index, knowledge
    from training.privacy import Redactor

    persona = session.persona
    notes = knowledge.notes(persona.knowledge, Redactor(persona.blocklist))
    folders = index.persona_indexes(persona)
    if not folders:
        raise CliError("no index yet: run `clone prepare` (it builds one with your notes)")
    for folder in folders:  # every one readable before anything is rewritten
        try:
            index.PersonaIndex.load(folder)
        except index.IndexProblem as e:
            raise CliError(f"{e}: run `clone prepare` to build the index anew") from None
    embedder = embedder or _embedder()
    for folder in folders:
        built = index.reindex(folder, notes, embedder)
        print(f"Re-indexed {shown(folder)}: {len(built):,} items, {len(notes)} note passages")


def cmd_list(args: argparse.Namespace) -> None:
    from training import knowledge
    from training.index import IndexProblem, PersonaIndex, persona_indexes

    session = open_session(args)
    using(session.persona)
    folder = session.persona.knowledge
    files = knowledge.note_files(folder)
    print(f"Notes in {shown(folder) if folder else '-'}: {len(files)} file(s)")
    for path in files:
        passages = knowledge.passages(knowledge.read_note(path))
        print(f"  {path.relative_to(folder)}  ({len(passages)} passages)")
    for path in persona_indexes(session.persona):
        try:
            built = PersonaIndex.load(path)
        except IndexProblem as e:
            print(f"Index {shown(path)}: unusable ({e})")
            continue
        kinds = ", ".join(f"{k}: {n:,}" for k, n in sorted(built.kinds().items()))
        print(f"Index {shown(path)}: {len(built):,} items ({kinds}), {built.model}")


def cmd_add(args: argparse.Namespace) -> None:
    from training.index import persona_indexes

    session = open_session(args)
    folder = session.persona.knowledge
    assert folder is not None
    folder.mkdir(parents=True, exist_ok=True)
    added = []
    for path in args.files:
        if not path.is_file():
            raise CliError(f"{path}: no such file (to write a note here, give its text with --text)")
        if path.suffix.lower() not in (".md", ".txt"):
            raise CliError(f"{path}: a knowledge note is a .md or .txt file")
        shutil.copyfile(path, folder / path.name)
        added.append(path.name)
    if args.text:
        name = f"note-{time.strftime('%Y%m%d-%H%M%S')}.md"
        (folder / name).write_text(args.text.strip() + "\n", encoding="utf-8")
        added.append(name)
    if not added:
        raise CliError("nothing to add: give note files or --text")
    print(f"Added to {shown(folder)}: {', '.join(added)}")
    if not persona_indexes(session.persona):  # nothing to update: prepare indexes every note
        print("No index yet: `clone prepare` (or `clone start`) will index it with the rest.")
        return
    reindex_all(session)


def cmd_search(args: argparse.Namespace) -> None:
    from bot.runtime import index_folder
    from training.index import IndexProblem, PersonaIndex

    session = open_session(args)
    folder = index_folder(session.persona, None)
    if folder is None:
        raise CliError("no index yet: run `clone prepare`")
    embedder = _embedder()
    try:
        built = PersonaIndex.load(folder, embedder.name)
    except IndexProblem as e:
        raise CliError(f"{e}: run `clone knowledge reindex`") from None
    [vector] = embedder.embed([args.query])
    for score, item in built.search(vector, args.k):
        print(f"{score:6.3f}  {item.kind:<8} {item.recalled().line()[2:]}")


def cmd_reindex(args: argparse.Namespace) -> None:
    session = open_session(args)
    using(session.persona)
    reindex_all(session)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("knowledge", help="list, add and search what the clone knows (no retraining)",
                       formatter_class=HelpFormatter)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION", help="what to do")
    q = actions.add_parser("list", help="the notes and the persona's indexes")
    add_persona_option(q)
    q.set_defaults(func=cmd_list)
    q = actions.add_parser("add", help="copy .md/.txt notes into knowledge/ and re-index")
    add_persona_option(q)
    q.add_argument("files", nargs="*", type=Path, metavar="FILE", help="note files (.md, .txt)")
    q.add_argument("--text", help="a note written here instead of a file")
    q.set_defaults(func=cmd_add)
    q = actions.add_parser("search", help="what the clone would recall for a message")
    add_persona_option(q)
    q.add_argument("query", help="a message, as someone would send it")
    q.add_argument("-k", type=int, default=5, help="how many items")
    q.set_defaults(func=cmd_search)
    q = actions.add_parser("reindex", help="re-index the notes after editing knowledge/ by hand")
    add_persona_option(q)
    q.set_defaults(func=cmd_reindex)
