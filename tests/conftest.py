"""Shared fixtures: the real packaged tokenizer (converted once, then cached on disk)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def private_memory_file(tmp_path, monkeypatch):
    """The terminal chat's memory goes to the test's own folder, never the user's."""
    monkeypatch.setenv("CLONE_MEMORY_FILE", str(tmp_path / "memory.json"))


@pytest.fixture(scope="session")
def tokenizer():
    from training.base_model import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def count_tokens(tokenizer) -> Callable[[str], int]:
    from training.base_model import token_counter

    return token_counter(tokenizer)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tokenizer) -> Path:
    """A randomly initialised two-layer llama with the real SmolLM2 tokenizer: trains in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        initializer_range=0.4,  # frozen embeddings this wide let LoRA move the logits
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def chat_messages(conversations: int = 24, seed: int = 0):
    """Two-person chats in which the person ('u1') always texts the same way: learnable."""
    import random
    from datetime import UTC, datetime, timedelta

    from training.message import Message

    rng = random.Random(seed)
    topics = ["pizza", "the beach", "homework", "football", "music", "the movie", "coffee", "hiking"]
    out = []
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    n = 0
    for c in range(conversations):
        start = t0 + timedelta(days=c)
        for turn, topic in enumerate(rng.sample(topics, 4)):  # no repeats: not near duplicates
            for k, (author, text) in enumerate((("u2", f"what do you think about {topic}?"),
                                                ("u1", f"haha {topic} is so good\nlove it"))):
                n += 1
                at = start + timedelta(minutes=2 * turn + k)
                out.append(Message("telegram", f"chat{c % 3}", "chat", str(n), author, author.upper(),
                                   at, text, "text", None))
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, count_tokens) -> Path:
    from training.dataset import PrepareConfig, build, write
    from training.persona import Persona

    folder = tmp_path_factory.mktemp("data") / "dataset"
    # No persona index here (training.prepare builds one): no room kept for recalled items.
    cfg = PrepareConfig(me=["u1"], val_fraction=0.2, max_tokens=128, recall_tokens=0)
    prepared = build(chat_messages(), Persona(name="Sam", me=("u1",)), cfg, count_tokens)
    write(prepared, folder)
    return folder
