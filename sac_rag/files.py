"""Crash-safe file writes: a reader sees the old content or all of the new, never a mix; and the
append-only JSONL logs that results grow in (rows already written are never rewritten)."""

from __future__ import annotations

import json
import os
from pathlib import Path


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


def append_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append each row to ``path`` as one JSON line, creating its folder; earlier rows stay as they are."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
