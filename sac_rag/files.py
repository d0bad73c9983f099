"""Crash-safe file writes: a reader sees the old content or all of the new, never a mix; the
append-only JSONL logs that results grow in (rows already written are never rewritten); and the
file lock that keeps a second writer out."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TextIO

from .errors import InvalidInputError

try:  # POSIX file locks
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

HAVE_FILE_LOCKS = fcntl is not None


def user_path(text: str) -> str:
    """A path given on a command line, ``~`` expanded (the shell leaves ``--opt=~/x`` as written):
    argparse's ``type=`` for path options."""
    return os.path.expanduser(text)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file beside ``path``, fsync it, rename it over ``path``, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class FileLock:
    """An exclusive ``flock`` on ``path`` (created if missing), held from ``__enter__`` to
    ``__exit__``; the OS releases it when the process dies, so a kill never leaves it held.
    ``wait=False``: ``BlockingIOError`` at once if another process (or another open of the file)
    holds it. Needs ``HAVE_FILE_LOCKS``."""

    def __init__(self, path: str | os.PathLike, *, wait: bool = True):
        self.path = Path(path)
        self.wait = wait
        self.fd = -1

    def __enter__(self) -> FileLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1


def open_for_appending(path: str | os.PathLike) -> TextIO:
    """``path`` (a JSON-lines file; created with its folder if missing) opened for appending, after
    ending its last line: one without a newline is a write cut short by a kill (every writer appends
    whole lines in one write) and is dropped, unless it is a whole JSON object (a row that lost only
    its newline, say in an editor), which is kept; so the next line starts a line of its own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as file:
        size = file.seek(0, os.SEEK_END)
        if size:
            file.seek(max(0, size - (1 << 16)))
            tail = file.read()
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                if cut < 0 and size > len(tail):
                    raise InvalidInputError(f"{path} ends in a line over 64 KiB long: not a JSON-lines file "
                                            "of sac_rag's")
                if is_json_object(tail[cut + 1:]):
                    file.write(b"\n")
                else:
                    file.truncate(size - len(tail) + cut + 1)
    return open(path, "a")


def is_json_object(line: str | bytes) -> bool:
    """Whether ``line`` is a whole JSON object: a JSON-lines row (no prefix of one is one, so a line
    without its newline that is one lost only the newline, not part of the row)."""
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def append_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append the rows to ``path`` as JSON lines, in one write (``open_for_appending``: a line a
    killed write cut short is dropped first); earlier rows stay as they are."""
    with open_for_appending(path) as file:
        file.write("".join(json.dumps(row) + "\n" for row in rows))
