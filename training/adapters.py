"""The adapter registry of a persona: `<persona>/adapters/<version>/` folders, each with a
manifest, and an `active` pointer.

A folder is an adapter only once its `manifest.json` exists: the manifest is written last,
inside a staging folder that is renamed into place whole. `active` is a symlink that is replaced
in one rename, so a reader sees the old adapter or the new one, never a mix. The manifest names
the persona it was trained for, and an adapter is refused for any other; it holds no absolute
path, so an adapter folder can be moved to a server as it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from training.prompt import CONTRACT_VERSION

MANIFEST = "manifest.json"
ACTIVE = "active"


class AdapterError(RuntimeError):
    """An adapter that is missing, incomplete, or speaks another prompt contract."""


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def versions(root: Path) -> list[dict]:
    """Every complete adapter under `root`, oldest first, each manifest with its `path`."""
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or folder.is_symlink() or not folder.is_dir():
            continue
        manifest = read_manifest(folder)
        if manifest is not None:
            found.append({**manifest, "path": str(folder)})
    return found


def active_version(root: Path) -> str | None:
    link = root / ACTIVE
    if not link.is_symlink():
        return None
    target = os.readlink(link)
    return Path(target).name if read_manifest(root / target) is not None else None


def activate(root: Path, version: str) -> None:
    """Point `active` at `version` in one atomic rename."""
    if read_manifest(root / version) is None:
        raise AdapterError(f"{root / version} is not an adapter (no {MANIFEST})")
    tmp = root / f".{ACTIVE}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(version, tmp)
    os.replace(tmp, root / ACTIVE)


def new_version(root: Path) -> str:
    """A fresh version name: the UTC time, with a suffix should two runs start in one second."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    name, n = stamp, 1
    while (root / name).exists() or (root / ".work" / name).exists():
        n += 1
        name = f"{stamp}-{n}"
    return name


def resolve(root: Path, version: str | None = None, persona_id: str | None = None) -> tuple[Path, dict]:
    """The folder and manifest of `version`, or of the active adapter. Checks the prompt contract
    and, given `persona_id`, that the adapter was trained for that persona."""
    version = version or active_version(root)
    if version is None:
        raise AdapterError(f"no active adapter in {root}: run `clone train` first")
    folder = root / version
    manifest = read_manifest(folder)
    if manifest is None:
        known = ", ".join(v["version"] for v in versions(root)) or "none yet"
        raise AdapterError(f"no adapter {version!r} in {root} (known: {known})")
    check_contract(manifest, folder)
    if persona_id is not None:
        check_persona(manifest, folder, persona_id)
    return folder, manifest


def check_persona(manifest: dict, folder: Path, persona_id: str) -> None:
    owner = (manifest.get("persona") or {}).get("id")
    if owner is not None and owner != persona_id:
        raise AdapterError(
            f"{folder} was trained for persona {owner!r}, not {persona_id!r}: an adapter speaks as "
            f"the person it learnt from. Train one for {persona_id!r} with `clone train`"
        )


def check_contract(manifest: dict, folder: Path) -> None:
    spoken = manifest.get("prompt_contract")
    if spoken != CONTRACT_VERSION:
        raise AdapterError(
            f"{folder} was trained with prompt contract v{spoken}, but this version of the bot speaks "
            f"v{CONTRACT_VERSION}: retrain it with `clone retrain`, or use a matching release"
        )


def locate_base(manifest: dict, folder: Path, base: str | None = None):
    """The base model an adapter was trained on, found here and checked by hash. A local model
    folder is recorded by name only (no paths in a manifest): pass it as `base`."""
    from training.base_model import resolve_base

    recorded = manifest["base_model"]
    if base is None and recorded.get("source") == "folder":
        raise AdapterError(
            f"{folder} was trained on the local model folder {recorded['id']!r}: pass its path as --base"
        )
    found = resolve_base(base or recorded["id"])
    if found.sha256 != recorded["sha256"]:
        raise AdapterError(f"{folder} was trained on other weights than the base model {found.id} found here")
    return found


@contextlib.contextmanager
def tied_head_accepted() -> Iterator[None]:
    """Silences peft's warning about a LoRA on an output layer tied to the embeddings (SmolLM2's):
    the adapter keeps its own update of the head, and bot.generation unties the head before it
    merges, so the embeddings never change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        yield


def load(root: Path, version: str | None = None, persona_id: str | None = None, base: str | None = None,
         dtype=None, attention: str = "sdpa"):
    """Base model with the adapter attached, its tokenizer, and its manifest."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from training.base_model import load_model

    folder, manifest = resolve(root, version, persona_id)
    found = locate_base(manifest, folder, base)
    with tied_head_accepted():
        model = PeftModel.from_pretrained(load_model(found, dtype, attention), str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model, tokenizer, manifest
