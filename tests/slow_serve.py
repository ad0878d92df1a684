"""`python -m tests.slow_serve serve ...`: the `clone` command, with a model as slow as a small CPU.

Every step of the model sleeps CLONE_TEST_STEP_S seconds and a turn is always CLONE_TEST_TOKENS
tokens long, so each generation takes at least their product: long enough to SIGTERM a process in
the middle of one. While the file CLONE_TEST_HOLD names exists, the model does not step at all.
Everything else (PTB, the gate, Redis, the model itself) is the real thing.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from bot import generation

STEP_S = float(os.environ.get("CLONE_TEST_STEP_S", "0.05"))
TOKENS = int(os.environ.get("CLONE_TEST_TOKENS", "64"))
HOLD = os.environ.get("CLONE_TEST_HOLD")
_init = generation.LocalBackend.__init__


def _slow_step(module: Any, args: Any) -> None:
    while HOLD and os.path.exists(HOLD):
        time.sleep(0.02)
    time.sleep(STEP_S)


def _slow_init(self: generation.LocalBackend, model: Any, tokenizer: Any, settings: Any = None) -> None:
    _init(self, model, tokenizer, settings)
    self.settings.max_new_tokens = self.model.generation_config.min_new_tokens = TOKENS
    self.model.get_input_embeddings().register_forward_pre_hook(_slow_step)


generation.LocalBackend.__init__ = _slow_init  # type: ignore[method-assign]

if __name__ == "__main__":
    from cli.main import main

    sys.exit(main(sys.argv[1:]))
