"""A persona's settings: who the clone is, which authors in the exports are that person, what to hide.

They live in `persona_data/<persona>/persona.toml`, beside the person's exports.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path


class PersonaError(ValueError):
    pass


@dataclass(frozen=True)
class Persona:
    name: str
    description: str = ""
    me: tuple[str, ...] = ()          # author names or ids that are this person, across platforms
    blocklist: tuple[str, ...] = ()   # words and names to redact before training
    root: Path | None = None          # the persona's folder, when loaded from one
    # The [serve] table as written: who the bot answers and how often. bot.gate validates it.
    serve: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def exports(self) -> Path | None:
        return self.root / "exports" if self.root else None

    @property
    def dataset(self) -> Path | None:
        return self.root / "dataset" if self.root else None

    @classmethod
    def load(cls, folder: Path) -> Persona:
        path = folder / "persona.toml"
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PersonaError(f"{path}: no persona settings (persona.toml) here") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise PersonaError(f"{path}: {e}") from None
        name = data.get("name")
        if not isinstance(name, str) or not name.strip():
            raise PersonaError(f"{path}: `name` must be a non-empty string")

        def strings(key: str) -> tuple[str, ...]:
            value = data.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise PersonaError(f"{path}: `{key}` must be a list of strings")
            return tuple(v for v in value if v.strip())

        description = data.get("description", "")
        if not isinstance(description, str):
            raise PersonaError(f"{path}: `description` must be a string")
        serve = data.get("serve", {})
        if not isinstance(serve, dict):
            raise PersonaError(f"{path}: `serve` must be a table ([serve])")
        return cls(name.strip(), description.strip(), strings("me"), strings("blocklist"), folder, serve)
