"""Command-line flags made from the training config dataclasses (TRL / HfArgumentParser style):
each flag's type, default and help come from its field, so defaults live in one place."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

PERSONA_HELP = ("persona folder, or the name of one in persona_data/ (default: $CLONE_PERSONA, else "
                "your only persona there, else the sample)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default after its help, unless there is none worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or not action.help:
            return action.help or ""
        return super()._get_help_string(action)


def _flag_type(hint: Any) -> type:
    """str/int/float/Path from a field's annotation (`X | None` counts as X)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    return base if base in (int, float, str, Path) else str


def add_config_options(parser: argparse.ArgumentParser, cls: type, names: list[str],
                       aliases: dict[str, list[str]] | None = None, **defaults: Any) -> None:
    """One `--flag-name` per field in `names`; `defaults` override the dataclass's defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        f = fields[name]
        default = defaults.get(name, f.default)
        flags = [f"--{name.replace('_', '-')}", *(aliases or {}).get(name, [])]
        shared = parser._option_string_actions.get(flags[0])
        if shared is not None:  # e.g. --seed of prepare and of train: one value for both
            shared.help = f"{shared.help} {f.metadata.get('help', '')}".strip()
            continue
        if hints[name] is bool:  # a setting that is on by default gets its --no- twin
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(*flags, dest=name, action=action, default=default,
                                help=f.metadata.get("help"))
        else:
            parser.add_argument(*flags, dest=name, type=_flag_type(hints[name]), default=default,
                                metavar=name.upper(), choices=f.metadata.get("choices"),
                                help=f.metadata.get("help"))


def config_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The parsed values of the fields of `cls` that have flags."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def add_persona_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--persona", metavar="DIR_OR_NAME", help=PERSONA_HELP)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Which clone answers: an adapter version, and the base model."""
    parser.add_argument("--version", help="adapter version (default: the persona's active one)")
    parser.add_argument("--base", help="base model folder, when the adapter was trained on a local "
                        "folder or there is no adapter (default: the packaged SmolLM2-135M-Instruct)")
