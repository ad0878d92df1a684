"""Write-then-rename, so a crash never leaves a half-written file or folder where a good one stood.

A failed write (a full disk included) removes what it had written and raises the OSError with the
destination's name on it, for a one-line message."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Errors only writing raises: the file that failed is then the one being written.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def _name_it(e: OSError, dest: Path) -> None:
    """Name the destination on a write error that names no file (write() and close() do not)."""
    if e.errno in _WRITE_ERRNOS and e.filename is None:
        e.filename = str(dest)


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator:
    """Open a temporary sibling of `path`; on success it replaces `path`, on error it vanishes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            _name_it(e, path)
        raise


def recover_dir(dest: Path) -> None:
    """Put back a folder that a crash left renamed aside in the middle of `staged_dir`'s swap."""
    if dest.exists():
        return
    aside = sorted(dest.parent.glob(f".{dest.name}.old-*"))
    if aside:
        os.rename(aside[-1], dest)


@contextmanager
def staged_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it takes `dest`'s place, on error it vanishes.

    The swap is two renames. Between them the old folder exists under a hidden name, and
    `recover_dir` puts it back, so even a crash at that instant loses nothing.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new-", dir=dest.parent))
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            _name_it(e, dest)
        raise
    aside = dest.parent / f".{dest.name}.old-{os.getpid()}"
    if dest.exists():
        os.rename(dest, aside)
    os.rename(tmp, dest)
    shutil.rmtree(aside, ignore_errors=True)
