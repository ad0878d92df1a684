"""`clone retrain`, started from the owner's console: one run at a time, in its own process so
that chatting stays responsive (training holds the CPU and the GIL for minutes), its progress read
from what it prints.

The Trainer's progress bar (tqdm) rewrites one line with carriage returns: "12/30 [00:03<00:05,
...]". The latest such line is the run's progress; other lines (what was imported, the verdict)
are kept, the last few, for the page. Every change of the status bumps `revision` and wakes
whoever waits in `changed` (the console's server-sent events). Nothing is logged: the output names
the persona's chats.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import re
import time
from collections import deque

# A tqdm bar: an elapsed time in brackets, "[00:03<00:05, ..." or "[01:02:03, ...".
BAR = re.compile(r"\[\d+:\d\d(?::\d\d)?[<,\]]")
STEPS = re.compile(r"(\d+)/(\d+)\s*\[")
STOP_WAIT_S = 10.0


class RetrainRun:
    """The latest retrain the console started, and its status."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, keep_lines: int = 12) -> None:
        self.argv, self.env = argv, env
        self.lines: deque[str] = deque(maxlen=keep_lines)
        self.bar: str | None = None
        self.exit_code: int | None = None
        self.started: float | None = None
        self.ended: float | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task | None = None
        self.revision = 0  # bumped on every change of status()
        self._changes = asyncio.Event()  # set, then replaced, on every bump

    def _bump(self) -> None:
        self.revision += 1
        self._changes.set()
        self._changes = asyncio.Event()

    def wake(self) -> None:
        """Wake every waiter in `changed` (the server is closing: streams should end)."""
        self._bump()

    async def changed(self, seen: int, timeout: float) -> bool:
        """Wait until the revision is past `seen`; False if `timeout` seconds passed first."""
        if self.revision == seen:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changes.wait(), timeout)
        return self.revision != seen

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> bool:
        """Start a run; False when one is already running."""
        if self.running:
            return False
        self.lines.clear()
        self.bar, self.exit_code, self.ended = None, None, None
        self.started = time.time()
        env = dict(self.env if self.env is not None else os.environ, PYTHONUNBUFFERED="1")
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env)
        self._task = asyncio.create_task(self._follow(self._proc))
        self._bump()
        return True

    async def _follow(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while chunk := await proc.stdout.read(4096):
            pending += decoder.decode(chunk)
            *done, pending = re.split(r"[\r\n]", pending)
            for line in done:
                self._take(line)
        self._take(pending + decoder.decode(b"", final=True))
        self.exit_code = await proc.wait()
        self.ended = time.time()
        self._bump()

    def _take(self, line: str) -> None:
        line = line.rstrip()
        if not line.strip():
            return
        if BAR.search(line):
            self.bar = line.strip()
        else:
            self.lines.append(line)
        self._bump()

    def state(self) -> str:
        if self.running:
            return "running"
        if self.started is None:
            return "idle"
        return "finished" if self.exit_code == 0 else "failed"

    def status(self) -> dict:
        """What the page and GET /api/retrain show."""
        steps = STEPS.search(self.bar) if self.bar else None
        progress = {"step": int(steps[1]), "total": int(steps[2])} if steps else None
        return {
            "state": self.state(), "exit_code": self.exit_code, "started": self.started,
            "ended": self.ended, "progress": progress, "bar": self.bar, "lines": list(self.lines),
        }

    async def stop(self) -> None:
        """End a run in progress (the console is closing): retrain writes atomically, so an
        interrupted run leaves the active adapter as it was."""
        if not self.running or self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._proc.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), STOP_WAIT_S)  # type: ignore[arg-type]
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._task  # type: ignore[misc]
