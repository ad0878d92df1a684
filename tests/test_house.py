"""The shape of the house, kept by tests: short functions, and layers that import only downward."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_a_screen():
    long = []
    for folder in ("bot", "training", "cli"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these: " + ", ".join(long)


def test_the_halves_never_import_the_command_line_and_training_never_imports_bot():
    for folder, forbidden in (("bot", ("cli",)), ("training", ("cli", "bot"))):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                bad = [n for n in names if n.split(".")[0] in forbidden]
                assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_the_engine_and_a_remote_bot_import_no_torch():
    code = ("import sys, bot.engine, bot.runtime, bot.openai_backend, bot.conversation, bot.telegram, "
            "bot.discord_bot, cli.main; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'peft')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
