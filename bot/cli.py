"""The `clone` command: one entry point for every job, from importing chats to serving the bot.

Each subcommand is a thin handler; the work lives in `training/` and `bot/`. Heavy imports
(transformers, torch) happen inside handlers so `clone --help` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from training.base_model import BaseModelError
from training.message import ExportError, ImportReport, Message
from training.persona import Persona, PersonaError

log = logging.getLogger("clone")
REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_PERSONA = REPO_ROOT / "persona_data" / "sample"
DEFAULT_PERSONA = Path(os.environ.get("CLONE_PERSONA") or SAMPLE_PERSONA)
DEFAULT_ADAPTERS = Path(os.environ.get("CLONE_ADAPTERS") or "adapters")


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
    from training.base_model import load_tokenizer, token_counter
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
    persona = dataclasses.replace(persona, me=tuple(me), blocklist=tuple(blocklist))

    count_tokens = token_counter(load_tokenizer(args.tokenizer))

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


# -- clone train / adapters / eval / retrain -------------------------------------------------


def train_config(args: argparse.Namespace, data: Path):
    from training.train import TrainConfig

    return TrainConfig(
        data=data,
        out=args.adapters,
        base=args.base,
        epochs=args.epochs,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        seed=args.seed,
        resume=getattr(args, "resume", False),
    )


def print_trained(result) -> None:
    m = result.manifest["metrics"]
    print(
        f"Adapter {result.version}: {m['steps']} steps, {m['train_tokens']:,} tokens in "
        f"{m['runtime_s']:.0f} s ({m['tokens_per_second']:.0f} tok/s); "
        f"validation perplexity {m['val_perplexity']}"
    )


def cmd_train(args: argparse.Namespace) -> None:
    from training.train import train

    data = args.data or DEFAULT_PERSONA / "dataset"
    result = train(train_config(args, data))
    print_trained(result)
    print(f"Active adapter: {args.adapters / 'active'} -> {result.version}")


def cmd_adapters(args: argparse.Namespace) -> None:
    from training import adapters

    if args.action == "use":
        if not args.version:
            raise CliError("which version? `clone adapters use VERSION`")
        try:
            adapters.resolve(args.adapters, args.version)
            adapters.activate(args.adapters, args.version)
        except adapters.AdapterError as e:
            raise CliError(str(e)) from None
        print(f"Active adapter: {args.version}")
        return
    found = adapters.versions(args.adapters)
    if not found:
        print(f"No adapters in {args.adapters} yet: run `clone train`")
        return
    active = adapters.active_version(args.adapters)
    print(f"{'':2}{'version':<20}{'persona':<16}{'steps':>7}{'val ppl':>9}{'tok/s':>8}  base model")
    for a in found:
        m = a.get("metrics", {})
        mark = "* " if a["version"] == active else "  "
        print(
            f"{mark}{a['version']:<20}{(a['dataset'].get('persona') or '?')[:15]:<16}"
            f"{m.get('steps', '?'):>7}{m.get('val_perplexity') or '-':>9}"
            f"{m.get('tokens_per_second') or '-':>8}  {a['base_model']['id']}"
        )


def cmd_eval(args: argparse.Namespace) -> None:
    from training.adapters import AdapterError
    from training.evaluate import evaluate

    try:
        result = evaluate(args.adapters, args.version, args.data, samples=args.samples)
    except AdapterError as e:
        raise CliError(str(e)) from None
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "examples"}, ensure_ascii=False))
        return
    ppl = result["perplexity"]
    print(f"Adapter {result['version']} on {result['val_replies']} held-out replies:")
    for name in ("base", "prompted", "adapter"):
        print(f"  perplexity {name:<9}{ppl[name]:>10.2f}")
    print(f"  adapter / prompted {ppl['adapter'] / ppl['prompted']:>8.3f}")
    print(f"Report: {result['report']}")


def cmd_retrain(args: argparse.Namespace) -> None:
    from training.retrain import retrain

    persona = load_persona(args.persona)
    assert persona is not None and persona.exports is not None and persona.dataset is not None
    known = [persona.exports] if persona.exports.is_dir() else []
    prepare([*known, *args.paths], persona, args)
    # Keep the new exports beside the old ones, so the next retrain sees them all.
    stamp = datetime.now(UTC).strftime("added-%Y%m%d-%H%M%S")
    for path in args.paths:
        if persona.exports.resolve() in path.resolve().parents:
            continue
        dest = persona.exports / stamp / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, dest)
    outcome = retrain(train_config(args, persona.dataset), force=args.force)
    print_trained(outcome.new)
    if outcome.active_val_loss is not None:
        print(
            f"Validation loss: new {outcome.new_val_loss:.4f}, "
            f"active {outcome.active_version} {outcome.active_val_loss:.4f}"
        )
    if outcome.activated:
        print(f"Active adapter: {outcome.new.version}")
    else:
        print(
            f"Kept {outcome.active_version} active: the new adapter is worse on the same validation "
            f"data. It stays available: `clone adapters use {outcome.new.version}` (or retrain --force)"
        )


# -- clone chat ----------------------------------------------------------------------------


def build_engine(args: argparse.Namespace, persona: Persona):
    """(engine, backend, memory, what): the clone behind the configured backend and memory."""
    from bot.engine import Engine
    from bot.generation import LocalBackend, load_clone
    from bot.memory import memory_from_env
    from bot.openai_backend import backend_from_env
    from training.base_model import load_tokenizer, token_counter

    remote = backend_from_env()
    if remote is not None:  # LLM_BASE_URL: a vLLM / llama.cpp / `clone serve-model` server
        backend, tokenizer, what = remote, load_tokenizer(args.base), f"server {remote.base_url}"
    else:
        model, tokenizer, what = load_clone(args.adapters, getattr(args, "version", None), args.base)
        backend = LocalBackend(model, tokenizer)
    memory = memory_from_env(persona.name)
    return Engine(persona, backend, memory, token_counter(tokenizer)), backend, memory, what


async def chat_loop(args: argparse.Namespace, persona: Persona) -> None:
    import asyncio

    from bot.engine import Delivery, Incoming

    engine, backend, memory, what = build_engine(args, persona)
    interactive = sys.stdin.isatty()
    delivery = Delivery(enabled=interactive and os.environ.get("CLONE_TYPING_DELAY", "1") != "0")
    print(f"Chatting with {persona.name} ({what}). /reset forgets this chat, /forget deletes what you "
          f"said, /quit leaves.", flush=True)
    try:
        while True:
            if interactive:
                print("you> ", end="", flush=True)
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line or line.strip() == "/quit":
                break
            text = line.strip()
            if not text:
                continue
            if text == "/reset":
                await engine.reset("terminal", "local")
                print("(conversation forgotten)", flush=True)
                continue
            if text == "/forget":
                removed = await engine.forget("terminal-user")
                print(f"(deleted {removed} of your messages from memory)", flush=True)
                continue
            incoming = Incoming("terminal", "local", "terminal-user", "you", text, is_dm=True)
            for reply in await engine.handle(incoming):
                await asyncio.sleep(delivery.delay(reply))
                print(f"{persona.name}: {reply}", flush=True)
    finally:
        await backend.close()
        await memory.close()


def cmd_chat(args: argparse.Namespace) -> None:
    import asyncio

    persona = load_persona(args.persona)
    assert persona is not None
    asyncio.run(chat_loop(args, persona))


def cmd_serve(args: argparse.Namespace) -> None:
    import asyncio

    from bot.gate import GateSettingsError, Rules, gate_from_env
    from bot.serve import Settings, SettingsError, load_dotenv, serve

    try:
        load_dotenv()
        settings = Settings.from_env(args.platform)
    except SettingsError as e:
        raise CliError(str(e)) from None
    persona = load_persona(args.persona)
    assert persona is not None
    try:
        rules = Rules.from_persona(persona)  # before the model loads: a typo fails in a second
    except GateSettingsError as e:
        raise CliError(str(e)) from None

    async def run() -> None:
        from bot.generation import AdapterWatcher, LocalBackend

        engine, backend, memory, what = build_engine(args, persona)
        gate = gate_from_env(persona, rules)
        watcher = None
        if isinstance(backend, LocalBackend) and not args.version:  # follow `clone retrain`
            interval = float(os.environ.get("CLONE_ADAPTER_CHECK_S", "10"))
            watcher = asyncio.create_task(
                AdapterWatcher(backend, args.adapters, args.base, interval).run())
        print(f"Serving {persona.name} ({what})", flush=True)
        try:
            await serve(engine, settings, args.platform, gate)
        except SettingsError as e:
            raise CliError(str(e)) from None
        finally:
            if watcher is not None:
                watcher.cancel()
            await gate.close()
            await backend.close()
            await memory.close()

    asyncio.run(run())


def cmd_serve_model(args: argparse.Namespace) -> None:
    from bot.serve_model import run_serve_model

    run_serve_model(args.adapters, args.version, args.base, args.host, args.port)


# -- clone start: the main job ---------------------------------------------------------------


def cmd_start(args: argparse.Namespace) -> None:
    """Everything a fresh machine needs, on the persona's own data (the sample by default)."""
    from training import adapters
    from training.train import train

    persona = load_persona(args.persona)
    assert persona is not None and persona.exports is not None
    print(f"Persona: {persona.name} ({args.persona})")
    data = prepare([persona.exports], persona, args)
    active = adapters.active_version(args.adapters)
    if active is None:
        print(f"No adapter yet: training one for {args.max_minutes:g} minutes (bounded)")
        result = train(train_config(args, data))
        print_trained(result)
    else:
        print(f"Active adapter: {active} (`clone retrain` makes a new one)")
    if not args.no_chat:
        cmd_chat(args)


# -- argument parsing ------------------------------------------------------------------------


def add_prepare_options(p: argparse.ArgumentParser, formats: tuple[str, ...]) -> None:
    p.add_argument("--me", action="append", metavar="NAME_OR_ID",
                   help="an author name or id that is you (repeat for each platform)")
    p.add_argument("--name", help="the persona's display name (default: your most used name)")
    p.add_argument("--out", type=Path, help="dataset folder (default: the persona's dataset/)")
    p.add_argument("--blocklist", type=Path, help="file of words and names to redact, one per line")
    p.add_argument("--format", choices=formats, help="force a format instead of detecting it")
    p.add_argument("--tokenizer", help="tokenizer for the token budget (default: the base model's)")
    p.add_argument("--max-tokens", type=int, default=512, help="token budget of one sample")
    p.add_argument("--gap-minutes", type=float, default=120.0,
                   help="silence that ends a conversation")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)


def add_train_options(p: argparse.ArgumentParser, minutes: float | None = None) -> None:
    p.add_argument("--base", help="base model folder or cached hub id (default: packaged SmolLM2)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=3.0)
    length.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--max-minutes", type=float, default=minutes, help="stop training after this long")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha is twice it)")


def add_adapters_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapters", type=Path, default=DEFAULT_ADAPTERS,
                   help="adapter registry folder (default: ./adapters or $CLONE_ADAPTERS)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Which clone answers: an adapter version, or a base model when there is no adapter."""
    p.add_argument("--version", help="adapter version (default: the active one)")
    p.add_argument("--base", help="base model when there is no adapter (default: packaged SmolLM2)")
    add_adapters_option(p)


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

    p = sub.add_parser("train", help="fine-tune a LoRA adapter on a prepared dataset")
    p.add_argument("--data", type=Path, help="dataset folder (default: the persona's dataset/)")
    p.add_argument("--out", dest="adapters", type=Path, default=DEFAULT_ADAPTERS,
                   help="adapter registry folder (default: ./adapters)")
    p.add_argument("--resume", action="store_true", help="continue the last interrupted run")
    p.add_argument("--seed", type=int, default=0)
    add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("adapters", help="list adapters; `adapters use VERSION` switches (rolls back)")
    p.add_argument("action", nargs="?", choices=["list", "use"], default="list")
    p.add_argument("version", nargs="?")
    add_adapters_option(p)
    p.set_defaults(func=cmd_adapters)

    p = sub.add_parser("eval", help="perplexity and style of an adapter against the base model")
    p.add_argument("version", nargs="?", help="adapter version (default: the active one)")
    p.add_argument("--data", type=Path, help="dataset folder (default: the one it was trained on)")
    p.add_argument("--samples", type=int, default=16, help="replies to generate for the style check")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_adapters_option(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("retrain", help="fresh exports to a new active adapter, never a worse one")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--persona", type=Path, default=DEFAULT_PERSONA)
    p.add_argument("--force", action="store_true", help="activate even if it is worse")
    add_prepare_options(p, FORMATS)
    add_train_options(p)
    add_adapters_option(p)
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("chat", help="chat with the clone in the terminal (works with piped input)")
    p.add_argument("--persona", type=Path, default=DEFAULT_PERSONA)
    add_model_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="serve the clone on Telegram and Discord (their tokens) in one process")
    p.add_argument("--platform", choices=["telegram", "discord"], help="serve this platform alone")
    p.add_argument("--persona", type=Path, default=DEFAULT_PERSONA)
    add_model_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("serve-model", help="serve the clone over the OpenAI chat-completions API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    add_model_options(p)
    p.set_defaults(func=cmd_serve_model)

    p = sub.add_parser("start", help="the main job: set the persona up end to end")
    p.add_argument("--persona", type=Path, default=DEFAULT_PERSONA)
    p.add_argument("--no-chat", action="store_true", help="stop after training, without the chat")
    add_prepare_options(p, FORMATS)
    add_train_options(p, minutes=4.0)
    add_adapters_option(p)
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
    except (CliError, ExportError, PersonaError, BaseModelError, FileNotFoundError, ValueError) as e:
        if args.verbose:
            raise
        print(f"clone {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was overwritten", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
