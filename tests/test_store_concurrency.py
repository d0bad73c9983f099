"""The anchor store across processes, mounts and maintenance: two writers at once, readers next to
gc, and stores seen through a read-only path (a read-only mount of a directory a writer writes).

Interleavings are made deterministic with patched hooks or by waiting for child processes; the
read-only views are real read-only bind mounts (root, as in CI), else the tests that need one skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_store import FP, _spawn, assert_same_kv, key, make_kv, shard_files

from sac_rag.store import (
    AnchorStore,
    StoreCorruptionError,
    StoreReadOnlyError,
    main,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def read_only_view(tmp_path):
    """``view(directory) -> path``: the same directory, seen through a read-only bind mount."""
    mounts = []

    def view(directory: Path) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a read-only bind mount needs root")
        target = tmp_path / f"ro-{len(mounts)}"
        target.mkdir()
        made = subprocess.run(["mount", "--bind", "-o", "ro", str(directory), str(target)],
                              capture_output=True, text=True, check=False)
        if made.returncode != 0:
            pytest.skip(f"cannot make a read-only bind mount here: {made.stderr.strip()}")
        mounts.append(target)
        return target

    yield view
    for target in mounts:
        subprocess.run(["umount", "-l", str(target)], check=False)


def _open_files(name: str) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if name in target:
            found.append(target)
    return found


# -- read-only paths --------------------------------------------------------------------------


def test_writing_a_store_on_a_read_only_path_is_refused_as_read_only_not_as_corruption(
        tmp_path, read_only_view, capsys):
    with AnchorStore.create(tmp_path / "rw" / "s", FP, ratio=5) as s:
        s.put_many([(key(i), make_kv(i)) for i in range(3)])
    path = read_only_view(tmp_path / "rw") / "s"

    for opening in (lambda: AnchorStore.open(path, FP),
                    lambda: AnchorStore.create(path, FP, ratio=5, exist_ok=True)):  # a precompress rerun
        with pytest.raises(StoreReadOnlyError, match="readonly=True") as info:
            opening()
        assert not isinstance(info.value, StoreCorruptionError) and isinstance(info.value, PermissionError)
    assert not _open_files(str(path / "index.sqlite")), "a refused open left the index open"

    assert main(["gc", str(path)]) == 2
    err = capsys.readouterr().err
    assert "read-only" in err and "corrupt" not in err and "unreadable" not in err
    assert main(["merge", str(path), str(tmp_path / "rw" / "s")]) == 2
    assert "read-only" in capsys.readouterr().err
    with AnchorStore.open(path, FP, readonly=True) as s:  # reading it is fine
        assert len(s) == 3 and s.verify().ok
        assert_same_kv(s.get(key(1)), make_kv(1))


def test_a_reader_on_a_read_only_view_sees_what_a_writer_adds_through_a_writable_path(
        tmp_path, read_only_view):
    with AnchorStore.create(tmp_path / "rw" / "s", FP, ratio=5) as s:
        s.put_many([(key(i), make_kv(i), {"i": i}) for i in range(3)])
    view = read_only_view(tmp_path / "rw") / "s"
    with AnchorStore.open(view, FP, readonly=True, cache_bytes=0) as reader:
        assert len(reader) == 3  # opened while no writer had the index open
        for start, stop in ((3, 6), (6, 9)):  # a writer process (another mount's view), twice
            writer = _spawn("_write_entries", tmp_path / "rw" / "s", start, stop, 2)
            _, err = writer.communicate(timeout=120)
            assert writer.returncode == 0, err
            assert len(reader) == stop and sorted(reader.keys()) == sorted(key(i) for i in range(stop))
            for i in range(stop):
                assert_same_kv(reader.get(key(i)), make_kv(i))
        assert reader.verify().ok


# -- gc next to readers -----------------------------------------------------------------------


def _add_orphan_bytes(path: Path) -> None:
    with open(shard_files(path)[-1], "ab") as f:  # what a writer killed before its commit leaves
        f.write(os.urandom(100))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_a_reader_releases_shards_that_gc_deleted(tmp_path):
    """gc's reclaimed bytes are freed on disk only when no process maps the deleted shard."""
    path = tmp_path / "s"
    with AnchorStore.create(path, FP, ratio=5) as s:
        s.put_many([(key(i), make_kv(i)) for i in range(3)])
    with AnchorStore.open(path, FP) as writer, \
            AnchorStore.open(path, FP, readonly=True, cache_bytes=0) as reader:
        for _ in range(3):
            assert_same_kv(reader.get(key(0)), make_kv(0))  # maps the current shard
            old = shard_files(path)[0]
            _add_orphan_bytes(path)
            assert writer.gc()["compacted_shards"] == 1 and not old.exists()
            assert_same_kv(reader.get(key(1)), make_kv(1))  # from the new shard
            maps = Path("/proc/self/maps").read_text()
            assert str(old) not in maps, "the reader still maps a shard gc deleted"


# -- two writer processes ---------------------------------------------------------------------


def test_two_writer_processes_at_once_keep_every_entry_of_both_exactly_once(tmp_path):
    path = tmp_path / "s"
    AnchorStore.create(path, FP, ratio=5, shard_bytes=50_000).close()
    writers = [_spawn("_write_entries", path, 0, 40, 3), _spawn("_write_entries", path, 20, 60, 4)]
    for writer in writers:
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
    with AnchorStore.open(path, FP, cache_bytes=0) as s:
        keys = s.keys()
        assert len(keys) == len(set(keys)) == 60 and set(keys) == {key(i) for i in range(60)}
        report = s.verify()
        assert report.ok and report.orphan_bytes == 0, report.summary()
        for i in range(60):
            assert s.metadata(key(i)) == {"i": i}
            assert_same_kv(s.get(key(i)), make_kv(i))


def test_a_writer_kept_waiting_by_another_says_which_lock_holds_it_then_writes(tmp_path, monkeypatch, caplog):
    """A writer that stopped (Ctrl-Z on a precompress) holds the lock until it goes on or dies; the
    one behind it must not look hung: after a while it names the lock and how to find its holder."""
    import threading

    from sac_rag.files import FileLock
    from sac_rag.store import LOCK

    path = tmp_path / "s"
    AnchorStore.create(path, FP, ratio=5).close()
    monkeypatch.setattr(FileLock, "patience", 0.1)
    with AnchorStore.open(path, FP) as s:
        holder = FileLock(path / LOCK)
        holder.__enter__()  # another open of the lock file: as another process, it keeps the store's writer out
        writer = threading.Thread(target=s.put, args=(key(0), make_kv(0)))
        with caplog.at_level("WARNING", logger="sac_rag.files"):
            writer.start()
            waited = []
            for _ in range(600):  # up to a minute for the warning to be logged
                waited = [r.getMessage() for r in caplog.records]
                if waited:
                    break
                writer.join(0.1)
            assert key(0) not in s  # still waiting
            holder.__exit__(None, None, None)
            writer.join(60)
        assert not writer.is_alive() and key(0) in s
    assert len(waited) == 1 and str(path) in waited[0] and f"fuser -v {path / LOCK}" in waited[0], waited


def test_cli_on_a_missing_path_a_file_or_a_damaged_manifest_exits_2_with_a_message(tmp_path, capsys):
    with AnchorStore.create(tmp_path / "s", FP, ratio=5) as s:
        s.put(key(0), make_kv(0))
    manifest = tmp_path / "s" / "manifest.json"
    (tmp_path / "file").write_text("x")
    run = subprocess.run([sys.executable, "-m", "sac_rag.store", "stats", str(tmp_path / "missing")],
                         capture_output=True, text=True, cwd=REPO, check=False)
    assert run.returncode == 2 and "no store" in run.stderr and "Traceback" not in run.stderr
    assert main(["gc", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "new"), str(tmp_path / "missing")]) == 2
    assert "no store" in capsys.readouterr().err
    text = manifest.read_text()
    for good, bad in (('"shard_bytes": ', '"shard_bytes": "big", "x": '),
                      ('"fingerprint": ', '"fingerprint": 5, "y": '),
                      ('"dtype": ', '"dtype": "int4", "z": ')):
        manifest.write_text(text.replace(good, bad, 1))
        for command in (["stats", str(tmp_path / "s")], ["merge", str(tmp_path / "new"), str(tmp_path / "s")]):
            assert main(command) == 2  # not a traceback
            assert "manifest" in capsys.readouterr().err
        with pytest.raises(StoreCorruptionError, match="manifest"):
            AnchorStore.open(tmp_path / "s", FP)
    assert not (tmp_path / "new").exists()
