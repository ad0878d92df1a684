"""The `clone` command: one entry point for every job, from importing chats to serving the bot.

Heavy imports (transformers, torch) happen inside the commands, so `clone --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
import warnings

from bot.serve import SettingsError
from cli import console, data, knowledge, model, start, talk
from cli.common import CliError
from cli.options import HelpFormatter
from training.message import ExportError
from training.persona import PersonaError

# Errors a user can fix: one line on stderr, exit status 2 (--verbose shows the traceback).
# OSError covers what the system refuses: a full disk, an I/O error, a permission.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CliError, ExportError, PersonaError, SettingsError, OSError, ValueError)


def version() -> str:
    try:
        return importlib.metadata.version("digital-clone")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def error_text(e: BaseException) -> str:
    """One line for an error: the system's own words for an OSError, with the file it names."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clone", description="Clone a person from their chat exports, and serve the clone.",
        formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"clone {version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (data, knowledge, model, talk, console, start):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from training.base_model import BaseModelError

    args = build_parser().parse_args(argv)
    # Raised inside transformers' own Trainer on every run: nothing a user can act on.
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
    except (*USER_ERRORS, BaseModelError) as e:
        if args.verbose:
            raise
        print(f"clone {args.command}: error: {error_text(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was overwritten", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
