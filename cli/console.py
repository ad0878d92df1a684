"""`clone console`: the owner's web page, to talk to the clone, correct it, teach it and manage
its adapters (bot.console)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
from collections.abc import Callable

from cli.common import CliError, Session, open_session
from cli.options import HelpFormatter, add_model_options, add_persona_option
from cli.talk import open_runtime, say_using

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def console_token(session: Session) -> tuple[str, bool]:
    """CLONE_CONSOLE_TOKEN, or a new random one (and True: it must be shown, once)."""
    given = session.settings.secret("clone_console_token")
    return (given, False) if given else (secrets.token_urlsafe(32), True)


def retrain_command(session: Session, args: argparse.Namespace) -> list[str]:
    """`clone retrain` for this persona (and the base model given here), as a child process."""
    assert session.persona.root is not None
    argv = [sys.executable, "-m", "cli", "retrain", "--persona", str(session.persona.root)]
    return argv + (["--base", args.base] if args.base else [])


def retrain_env() -> dict[str, str]:
    """The child's environment, without the console's token: retrain has no use for it."""
    return {k: v for k, v in os.environ.items() if k != "CLONE_CONSOLE_TOKEN"}


def reindexer(session: Session, runtime) -> Callable[[], str]:
    """`clone knowledge reindex`, for the console's note editor; a line saying what was done."""
    from cli.knowledge import reindex_all

    def run() -> str:
        embedder = runtime.recaller.embedder if runtime.recaller is not None else None
        try:
            reindex_all(session, embedder)  # prints what it re-indexed to the console's terminal
        except CliError as e:
            return f"not re-indexed: {e}"
        return "re-indexed: the clone recalls it from the next message"

    return run


def follower(session: Session, args: argparse.Namespace, runtime):
    """The adapter watcher's check, when the clone answers here with the active adapter."""
    from bot.generation import AdapterWatcher, LocalBackend

    if args.version or not isinstance(runtime.backend, LocalBackend):
        return None
    watcher = AdapterWatcher(runtime.backend, session.persona.adapters, args.base,
                             session.settings.clone_adapter_check_s, session.persona.id)
    return watcher.check


async def run_console(session: Session, args: argparse.Namespace, token: str, shown: bool) -> None:
    from bot.console import Console, ConsoleOptions, serve

    runtime = open_runtime(session, args)
    options = ConsoleOptions(token, retrain_command(session, args), retrain_env(),
                             reindexer(session, runtime), follower(session, args, runtime),
                             session.settings.clone_adapter_check_s)
    console = Console(runtime, options)
    host = f"[{args.host}]" if ":" in args.host else args.host

    def started() -> None:
        print(f"Console of {session.persona.name} ({runtime.what}) at http://{host}:{args.port}/ "
              "- Ctrl-C stops it", flush=True)
        if shown:  # the only time it is ever shown: it is not logged, nor kept anywhere
            print(f"Token (set CLONE_CONSOLE_TOKEN to choose your own): {token}", flush=True)

    try:
        await serve(console, args.host, args.port, started)
    finally:
        await runtime.close()


def cmd_console(args: argparse.Namespace) -> None:
    session = open_session(args)
    token, shown = console_token(session)
    if args.host not in LOOPBACK:
        print(f"Warning: listening on {args.host}: anyone who can reach it may try the token, and plain "
              "HTTP shows it to the network. Put it behind HTTPS (a reverse proxy) or keep 127.0.0.1.",
              file=sys.stderr)
    if not session.persona.root:
        raise CliError("the console needs a persona folder")
    say_using(session, args)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the normal way to stop a server
        asyncio.run(run_console(session, args, token, shown))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("console", help="the owner's web page: chat with the clone, correct it, teach it, "
                       "switch adapters, retrain", formatter_class=HelpFormatter)
    add_persona_option(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (keep it local)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on")
    add_model_options(p)
    p.set_defaults(func=cmd_console)
