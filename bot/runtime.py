"""The parts of one clone process, built once from plain values: one Redis connection pool, the
conversation memory, the gate, the generation backend, the recall (persona index, long-term
memory and the embedding model behind both) and the engine over them.

`clone chat` and `clone serve` (and later the owner's console) share this wiring. With a remote
generation server (`LLM_BASE_URL`) and recall off, nothing here imports torch: prompt budgets are
counted with the `tokenizers` library straight from a tokenizer.json. Recall embeds every
message with a small model that runs on torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.engine import Backend, Engine
from bot.gate import Gate, Rules, open_gate
from bot.memory import Memory, connect_redis, default_count_tokens, open_memory
from bot.recall import GROUNDED_CANDIDATES, GROUNDED_MIN, FactAnswers, RecallAnswers, Recaller
from training.persona import Persona


@dataclass(frozen=True)
class Remote:
    """An OpenAI-compatible generation server (vLLM, llama.cpp, `clone serve-model`)."""

    base_url: str
    model: str = "clone"
    api_key: str | None = None


@dataclass(frozen=True)
class ModelChoice:
    """Which clone answers: an adapter version of the persona (default: the active one), with the
    base model given when it is a local folder; or a remote server."""

    version: str | None = None
    base: str | None = None
    remote: Remote | None = None


@dataclass
class Runtime:
    engine: Engine
    backend: Backend
    memory: Memory
    gate: Gate
    redis: Any | None
    what: str  # what answers, for the user: "adapter 20261127-101500", "server http://..."
    recaller: Recaller | None = None

    async def close(self) -> None:
        await self.backend.close()
        await self.memory.close()
        if self.recaller is not None:
            await self.recaller.close()
        await self.gate.close()
        if self.redis is not None:
            await self.redis.aclose()


def tokenizer_counter(folder: Path) -> Callable[[str], int] | None:
    """len() in tokens from a folder's tokenizer.json, without transformers (and so without torch)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def remote_backend(persona: Persona, remote: Remote, version: str | None) -> tuple[Backend, Callable, str]:
    """The remote backend, and a token counter from the adapter's (or the cached base model's)
    tokenizer; a rough estimate when neither is on this machine."""
    from bot.openai_backend import OpenAIBackend
    from training import adapters
    from training.base_model import PACKAGED_MODEL_ID, cache_dir

    assert persona.adapters is not None
    active = version or adapters.active_version(persona.adapters)
    folders = ([persona.adapters / active] if active else []) + [cache_dir() / PACKAGED_MODEL_ID]
    count = next((c for f in folders if (c := tokenizer_counter(f)) is not None), default_count_tokens)
    backend = OpenAIBackend(remote.base_url, remote.model, remote.api_key)
    return backend, count, f"server {remote.base_url}"


def local_backend(persona: Persona, choice: ModelChoice) -> tuple[Backend, Callable, str]:
    """The persona's adapter (or the base model, with a warning) in this process."""
    from bot.generation import LocalBackend, load_clone
    from training.base_model import token_counter

    assert persona.adapters is not None
    model, tokenizer, what = load_clone(persona.adapters, choice.version, choice.base, persona.id)
    return LocalBackend(model, tokenizer), token_counter(tokenizer), what


@dataclass(frozen=True)
class RecallChoice:
    """Whether the clone recalls (knowledge, past exchanges, users' earlier words), and how long
    and how much it keeps of what each user said."""

    enabled: bool = True
    longterm_days: float = 90.0
    longterm_items: int = 500
    longterm_file: Path | None = None  # without Redis; default: the persona folder's longterm.json
    fact_answers: FactAnswers | None = field(default_factory=FactAnswers)  # None: always generate
    recall_answers: RecallAnswers | None = field(default_factory=RecallAnswers)  # None: always generate
    grounded_min: float | None = GROUNDED_MIN  # a question this near knowledge: grounded decoding
    grounded_candidates: int = GROUNDED_CANDIDATES  # grounded replies sampled, the nearest sent


def index_folder(persona: Persona, version: str | None) -> Path | None:
    """The persona index that goes with the adapter answering (its own copy), else the dataset's."""
    from training import adapters

    assert persona.adapters is not None and persona.dataset is not None
    active = version or adapters.active_version(persona.adapters)
    if active and (persona.adapters / active / "index").is_dir():
        return persona.adapters / active / "index"
    return persona.dataset / "index" if (persona.dataset / "index").is_dir() else None


def build_recaller(
    persona: Persona, version: str | None, redis: Any | None, choice: RecallChoice,
) -> Recaller:
    from bot.longterm import open_longterm
    from bot.recall import IndexFollower
    from training.embed import Embedder

    embedder = Embedder()
    # A pinned version keeps its index; otherwise the active adapter's, whichever it becomes.
    locate = None if version else (lambda: index_folder(persona, None))
    index = IndexFollower(index_folder(persona, version), embedder.name, locate)
    assert persona.root is not None
    path = choice.longterm_file or persona.root / "longterm.json"
    longterm = open_longterm(redis, path, max_items=choice.longterm_items, ttl_days=choice.longterm_days)
    return Recaller(persona.id, embedder, index, longterm, persona.blocklist)


def build_runtime(
    persona: Persona, choice: ModelChoice, *, redis_url: str | None = None,
    memory_file: Path | None = None, rules: Rules | None = None, recall: RecallChoice | None = None,
) -> Runtime:
    """Everything a chat or a bot needs, over one Redis pool when `redis_url` is given."""
    recall = recall or RecallChoice()
    if choice.remote is not None:
        backend, count, what = remote_backend(persona, choice.remote, choice.version)
    else:
        backend, count, what = local_backend(persona, choice)
    redis = connect_redis(redis_url) if redis_url else None
    memory = open_memory(redis, memory_file or persona.memory_file, count_tokens=count)
    gate = open_gate(persona, rules, redis)  # the persona's [serve] rules unless given
    recaller = build_recaller(persona, choice.version, redis, recall) if recall.enabled else None
    facts, told = (recall.fact_answers, recall.recall_answers) if recaller is not None else (None, None)
    engine = Engine(persona, backend, memory, count, recaller=recaller, fact_answers=facts,
                    recall_answers=told, grounded_min=recall.grounded_min if recaller is not None else None,
                    grounded_candidates=recall.grounded_candidates)
    return Runtime(engine, backend, memory, gate, redis, what, recaller)
