"""What every command starts from: the settings (read once), the persona folder it works on, and
one line that says which persona, dataset and adapter it uses."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from cli.settings import Settings, load_settings
from training.persona import Persona, PersonaError, choose_persona, is_sample


class CliError(Exception):
    """A problem the user can fix: printed as one line, exit status 2."""


@dataclass(frozen=True)
class Session:
    settings: Settings
    persona: Persona


def open_session(args: argparse.Namespace) -> Session:
    """Settings from the environment and `.env` files, and the persona the command works on.
    The persona's own `.env` is read after the current folder's, and wins."""
    from training import base_model

    here = load_settings(Path(".env"))
    folder, notice = choose_persona(getattr(args, "persona", None) or here.clone_persona, here.clone_personas)
    try:
        persona = Persona.load(folder)
    except PersonaError as e:
        raise CliError(str(e)) from None
    if notice:  # on stderr: stdout may be one JSON object (`clone eval --json`) read by a script
        print(f"Note: {notice}", file=sys.stderr)
    settings = load_settings(Path(".env"), persona.env_file)
    if settings.clone_cache:
        base_model.set_cache_dir(settings.clone_cache)
    return Session(settings, persona)


def refuse_sample(persona: Persona, what: str) -> None:
    """The sample persona is tracked by git: private exports must never land in it."""
    if persona.root is not None and is_sample(persona.root):
        raise CliError(
            f"{what} would put your own exports into the sample persona, which git tracks. "
            "Make your own first: `clone init NAME --name \"Your Name\" --me YOUR_NAME_IN_CHATS`, "
            "then pass --persona NAME (or set CLONE_PERSONA)")


def shown(path: Path | None) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    if path is None:
        return "-"
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


def dataset_summary(folder: Path | None) -> str:
    try:
        card = json.loads((folder / "card.json").read_text(encoding="utf-8")) if folder else None
    except (OSError, ValueError):
        card = None
    if not card:
        return f"dataset {shown(folder)} (not prepared yet)"
    fingerprint = str(card.get("fingerprint", "")).removeprefix("sha256:")[:12]
    return f"dataset {shown(folder)} ({card['samples']['train']:,} train samples, {fingerprint})"


def using(persona: Persona, *, dataset: bool = False, adapter: str | None = None) -> None:
    """One line: which persona, dataset and adapter this command uses."""
    parts = [f"Persona {persona.name} [{persona.id}] in {shown(persona.root)}"]
    if dataset:
        parts.append(dataset_summary(persona.dataset))
    if adapter is not None:
        parts.append(adapter)
    print(" · ".join(parts), flush=True)
