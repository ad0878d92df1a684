"""A persona: who the clone is, which authors in the exports are that person, what to hide, and
the one folder that holds everything derived from them.

    persona_data/<persona>/
        persona.toml     name, me, description, blocklist, [serve]; optional `id`
        .env             settings for this persona's bot (private, never committed)
        exports/         the raw chat exports (a question/answer CSV among them: facts)
        knowledge/       notes in the person's words (*.md, *.txt): indexed, recalled
        dataset/         train.jsonl, val.jsonl, card.json, index/ (derived)
        adapters/        <version>/ folders and the `active` pointer (derived)
        memory.json      the embedded conversation memory, when there is no Redis

The persona's `id` (persona.toml's `id`, else the folder's name) is what adapters record and
what memory keys are built from, so renaming the display name loses nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# The checkout's persona folders, and the sample persona that git tracks.
PERSONAS = Path(__file__).resolve().parent.parent / "persona_data"
SAMPLE = PERSONAS / "sample"


class PersonaError(ValueError):
    pass


def slug(text: str) -> str:
    """A stable id made from a name: lowercase ASCII letters, digits and dashes."""
    value = re.sub(r"[^a-z0-9]+", "-", text.casefold()).strip("-")[:64]
    return value or "persona"


@dataclass(frozen=True)
class Persona:
    name: str
    description: str = ""
    me: tuple[str, ...] = ()          # author names or ids that are this person, across platforms
    blocklist: tuple[str, ...] = ()   # words and names to redact before training
    root: Path | None = None          # the persona's folder, when loaded from one
    # The [serve] table as written: who the bot answers and how often. bot.gate validates it.
    serve: dict = field(default_factory=dict, compare=False, hash=False)
    id: str = ""                      # stable id; derived from the folder (or the name) when empty

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", slug(self.root.name if self.root else self.name))

    def _part(self, name: str) -> Path | None:
        return self.root / name if self.root else None

    @property
    def exports(self) -> Path | None:
        return self._part("exports")

    @property
    def knowledge(self) -> Path | None:
        return self._part("knowledge")

    @property
    def dataset(self) -> Path | None:
        return self._part("dataset")

    @property
    def adapters(self) -> Path | None:
        return self._part("adapters")

    @property
    def memory_file(self) -> Path | None:
        return self._part("memory.json")

    @property
    def env_file(self) -> Path | None:
        return self._part(".env")

    @classmethod
    def load(cls, folder: Path) -> Persona:
        path = folder / "persona.toml"
        if folder.exists() and not folder.is_dir():
            raise PersonaError(f"{folder}: not a persona folder (a folder holding persona.toml)")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PersonaError(f"{path}: no persona settings (persona.toml) here") from None
        except IsADirectoryError:
            raise PersonaError(f"{path}: is a folder, not a settings file") from None
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
        pid = data.get("id", slug(folder.resolve().name))
        if not isinstance(pid, str) or not ID_PATTERN.match(pid):
            raise PersonaError(f"{path}: `id` must be lowercase letters, digits, - and _ (at most 64)")
        return cls(name.strip(), description.strip(), strings("me"), strings("blocklist"), folder, serve,
                   pid)


def persona_folders(root: Path) -> list[Path]:
    """The persona folders (those holding a persona.toml) directly under `root`, by name."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "persona.toml").is_file())


def is_sample(folder: Path) -> bool:
    return folder.resolve() == SAMPLE.resolve()


def names_a_path(text: str) -> bool:
    """Whether a persona argument is a path ("./jo", "~/jo", "a/jo") rather than a name ("jo"):
    pathlib drops a leading "./", so the text itself is looked at."""
    return len(Path(text).parts) > 1 or text.startswith(("./", ".\\", "~")) or text in (".", "..")


def choose_persona(given: str | None, root: Path | None = None) -> tuple[Path, str | None]:
    """The persona folder a command works on, and a notice when it fell back to the sample.

    `given` (--persona, else CLONE_PERSONA) is a folder, or the name of one under `root`
    (default: the checkout's persona_data/). Without it: the only persona there besides the
    sample; with several, the user must choose; with none, the sample.
    """
    root = root or PERSONAS
    if given:
        path = Path(given).expanduser()
        if path.is_dir() or path.exists() or names_a_path(given):
            return path, None
        for candidate in (root / given, PERSONAS / given):
            if candidate.is_dir():
                return candidate, None
        names = ", ".join(p.name for p in persona_folders(root)) or "none yet"
        raise PersonaError(f"no persona {given!r}: not a folder here, nor one in {root} ({names})")
    own = [p for p in persona_folders(root) if not is_sample(p)]
    if len(own) == 1:
        return own[0], None
    if len(own) > 1:
        names = ", ".join(p.name for p in own)
        raise PersonaError(f"several personas in {root} ({names}): pass --persona NAME or set CLONE_PERSONA")
    return SAMPLE, ("using the sample persona; for your own, `clone init NAME` and pass --persona NAME "
                    "(or set CLONE_PERSONA)")


def copy_export(path: Path, dest_dir: Path) -> Path:
    """Copy one export file or folder into `dest_dir`, keeping its name."""
    if not path.exists():
        raise PersonaError(f"{path}: no such file or folder")
    dest = dest_dir / path.name
    dest_dir.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if path.is_dir() else shutil.copy2)(path, dest)
    return dest


def add_exports(persona: Persona, paths: list[Path]) -> Path | None:
    """Copy new exports into the persona's exports/added-<time>/<n>/, one folder per path, so
    two exports of the same name (Telegram always writes result.json) both stay. Paths already
    inside exports/ are left where they are. Returns the new folder (None when nothing was new)."""
    assert persona.exports is not None
    new = [p for p in paths if persona.exports.resolve() not in p.resolve().parents]
    if not new:
        return None
    added = persona.exports / datetime.now(UTC).strftime("added-%Y%m%d-%H%M%S")
    try:
        for i, path in enumerate(new, start=1):
            copy_export(path, added / f"{i:02d}")
    except BaseException:
        shutil.rmtree(added, ignore_errors=True)
        raise
    return added


def create_persona(folder: Path, name: str, me: list[str], description: str = "",
                   exports: list[Path] | None = None) -> Persona:
    """A new persona folder: persona.toml and exports/ (with copies of `exports`). Nothing is
    left behind when a copy fails."""
    if folder.exists():
        raise PersonaError(f"{folder} already exists: pick another name, or edit its persona.toml")
    # JSON strings and lists are valid TOML values.
    lines = [f"name = {json.dumps(name, ensure_ascii=False)}",
             f"description = {json.dumps(description, ensure_ascii=False)}",
             f"me = {json.dumps(me, ensure_ascii=False)}  # your names or ids in the exports",
             "blocklist = []  # extra words and names to redact", ""]
    (folder / "exports").mkdir(parents=True)
    try:
        (folder / "persona.toml").write_text("\n".join(lines), encoding="utf-8")
        for i, path in enumerate(exports or [], start=1):
            copy_export(path, folder / "exports" / f"{i:02d}")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return Persona.load(folder)
