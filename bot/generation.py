"""The in-process generation backend: the active adapter (or the base model) behind a batching queue.

Requests from different channels that arrive together are generated in one batch (measured
about 5.7x the throughput of one at a time on a CPU). The model runs in a worker thread, off
the event loop; the queue is bounded, and a full queue answers `Busy` at once rather than
making a user wait minutes.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training.encode import encode

log = logging.getLogger(__name__)


class Busy(Exception):
    """Too many requests are already waiting."""


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    max_batch: int = 8
    max_queue: int = 32


@dataclass
class _Request:
    messages: list[dict[str, str]]
    future: asyncio.Future = field(repr=False)


def load_clone(adapters_root: Path, version: str | None = None, base: str | None = None):
    """(model, tokenizer, description): the active adapter, else the base model with a warning."""
    from training import adapters
    from training.base_model import load_model, load_tokenizer, resolve_base

    if version or adapters.active_version(adapters_root):
        model, tokenizer, manifest = adapters.load(adapters_root, version)
        return model, tokenizer, f"adapter {manifest['version']}"
    log.warning("No adapter in %s: answering with the base model, which imitates no one", adapters_root)
    resolved = resolve_base(base)
    return load_model(resolved), load_tokenizer(resolved), f"base model {resolved.id}"


class LocalBackend:
    def __init__(self, model, tokenizer, settings: GenerationSettings | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.settings = settings or GenerationSettings()
        self._queue: asyncio.Queue[_Request] | None = None
        self._worker: asyncio.Task | None = None

    async def generate(self, messages: list[dict[str, str]]) -> str:
        """The model's next turn after `messages` (raw text: post-processing is the engine's)."""
        if self._queue is None:
            self._queue = asyncio.Queue(self.settings.max_queue)
            self._worker = asyncio.create_task(self._run())
        request = _Request(messages, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            raise Busy from None
        return await request.future

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.settings.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                texts = await asyncio.to_thread(self.generate_batch, [r.messages for r in batch])
            except Exception as e:  # one bad batch must not kill the worker
                log.exception("Generation failed for a batch of %d", len(batch))
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)
                continue
            for r, text in zip(batch, texts, strict=True):
                if not r.future.done():
                    r.future.set_result(text)

    @torch.no_grad()
    def generate_batch(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        """Left-padded batch generation; message text can never become a template token."""
        s = self.settings
        prompts = [encode(c, self.tokenizer, add_generation_prompt=True).input_ids for c in conversations]
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        device = next(self.model.parameters()).device
        out = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=s.max_new_tokens,
            do_sample=s.temperature > 0,
            temperature=s.temperature if s.temperature > 0 else None,
            top_p=s.top_p if s.temperature > 0 else None,
            repetition_penalty=s.repetition_penalty,
            pad_token_id=pad,
        )
        return self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=False)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
