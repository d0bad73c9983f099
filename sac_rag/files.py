"""Crash-safe file writes: a reader sees the old content or all of the new, never a mix; the
append-only JSONL logs that results grow in (rows already written are never rewritten); and the
file lock that keeps a second writer out."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import TextIO

from .errors import InvalidInputError

try:  # POSIX file locks
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

HAVE_FILE_LOCKS = fcntl is not None

logger = logging.getLogger(__name__)


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


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing directories (or files) in one atomic step, so that no reader ever finds
    either name missing: Linux's ``renameat2(RENAME_EXCHANGE)``. False where the platform or the
    file system cannot (then nothing was changed and the caller falls back to two renames)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


@functools.cache
def _renameat2():
    """libc's ``renameat2`` (glibc 2.28+, musl 1.2.2+), or None."""
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name, use_errno=True).renameat2 if name else None
    except (OSError, AttributeError):
        return None
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


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
    holds it. ``wait=True`` waits as long as it takes, saying so once (``waiting_message``, logged
    as a warning) when the lock is still held after ``patience`` seconds, so a holder that is
    stopped or hung is not mistaken for a hang of this process. Needs ``HAVE_FILE_LOCKS``."""

    patience = 5.0  # seconds of waiting before the waiting message

    def __init__(self, path: str | os.PathLike, *, wait: bool = True, waiting_message: str | None = None):
        self.path = Path(path)
        self.wait = wait
        self.waiting_message = waiting_message or (
            f"waiting for the lock {self.path}, which another process holds (find it with `fuser -v {self.path}`)")
        self.fd = -1

    def __enter__(self) -> FileLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            if self.wait:
                self._wait_for(fd)
            else:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def _wait_for(self, fd: int) -> None:
        deadline = time.monotonic() + self.patience
        while time.monotonic() < deadline:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                time.sleep(0.05)
        logger.warning(self.waiting_message)
        fcntl.flock(fd, fcntl.LOCK_EX)

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
