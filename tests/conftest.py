"""Shared fixtures: the real packaged tokenizer (converted once, then cached on disk)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tokenizer():
    from training.base_model import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def count_tokens(tokenizer) -> Callable[[str], int]:
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
