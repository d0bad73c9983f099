"""Deleting entries from an anchor store (``AnchorStore.delete``, ``python -m sac_rag.store prune``):
what is deleted is not found (by this reader or another one), the rest is intact, ``gc`` reclaims
the bytes, a delete is one transaction (a failure or a kill -9 at any moment leaves all of its
entries or none), and reads, verify and merge running next to deletes and gc stay correct.
"""

from __future__ import annotations

import errno
import json
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_store import FP, REPO, assert_same_kv, key, make_kv, shard_files
from test_store import _spawn as spawn

from sac_rag import store as store_module
from sac_rag.errors import InvalidInputError
from sac_rag.store import AnchorStore, EntryNotFoundError, StoreCorruptionError, StoreWriteError, main, merge

ENTRY_BYTES = len(make_kv(0).to_bytes())


def _store(path: Path, n: int, **create) -> Path:
    with AnchorStore.create(path, FP, ratio=5, **create) as s:
        s.put_many([(key(i), make_kv(i), {"i": i}) for i in range(n)])
    return path


def _shard_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in shard_files(path))


def _spawn(function: str, *args) -> subprocess.Popen:
    """Run ``function(*args)`` of this module in a fresh Python process."""
    return spawn(function, *args, module="test_store_delete")


# -- deleting -----------------------------------------------------------------------------------


def test_deleted_entries_are_not_found_the_rest_stay_intact_and_gc_reclaims_their_bytes(tmp_path):
    path = _store(tmp_path / "s", 12, shard_bytes=30_000)  # two entries a shard
    gone = [key(i) for i in (0, 1, 2, 3, 7)]  # shards 0 and 1 emptied, shard 3 left half full
    kept = [i for i in range(12) if key(i) not in gone]
    with AnchorStore.open(path, FP) as s, AnchorStore.open(path, FP, readonly=True) as other:
        cached = [s.get(k) for k in gone] + other.get_many(gone)  # both caches hold them
        assert len(cached) == 10 and _shard_bytes(path) == 12 * ENTRY_BYTES
        before = s.stats()
        assert s.delete([*gone, key(99), key(3)]) == len(gone)  # unknown and repeated keys: not counted
        assert s.delete(gone) == 0
        for reader in (s, other):  # this store's cache and another reader's
            assert len(reader) == len(kept) and sorted(reader.keys()) == sorted(key(i) for i in kept)
            for k in gone:
                assert k not in reader and reader.missing([k]) == [k]
                with pytest.raises(EntryNotFoundError, match="no entry"):
                    reader.get(k)
                with pytest.raises(KeyError):
                    reader.metadata(k)
            with pytest.raises(EntryNotFoundError, match="1 of 2 keys"):
                reader.get_many([key(4), key(3)])
        deleted_bytes = len(gone) * ENTRY_BYTES
        after = s.stats()
        assert after["entries"] == before["entries"] - len(gone)
        assert after["entry_bytes"] == before["entry_bytes"] - deleted_bytes
        assert after["orphan_bytes"] == deleted_bytes and _shard_bytes(path) == 12 * ENTRY_BYTES
        report = s.verify()
        assert report.ok and (report.entries, report.orphan_bytes) == (len(kept), deleted_bytes)

        assert s.gc() == {"removed_shards": 2, "compacted_shards": 1, "moved_entries": 1,
                          "reclaimed_bytes": deleted_bytes, "removed_temp_files": 0}
        assert s.stats()["orphan_bytes"] == 0 and _shard_bytes(path) == len(kept) * ENTRY_BYTES
        for reader in (s, other):  # also the moved entry, from its new shard
            for i in kept:
                assert_same_kv(reader.get(key(i)), make_kv(i))
                assert reader.metadata(key(i)) == {"i": i}
        assert s.put(key(0), make_kv(0)) is True  # a deleted key can be stored again
        assert_same_kv(other.get(key(0)), make_kv(0))
    with AnchorStore.open(path, FP, readonly=True) as s:
        report = s.verify()
        assert report.ok and (report.entries, report.orphan_bytes) == (len(kept) + 1, 0), report.summary()


def test_delete_is_refused_on_a_read_only_store_and_for_a_bare_key(tmp_path):
    path = _store(tmp_path / "s", 3)
    with AnchorStore.open(path, FP, readonly=True) as s:
        with pytest.raises(InvalidInputError, match=r"read-only \(readonly=True\); to delete entries from it"):
            s.delete([key(0)])
        assert len(s) == 3
    with AnchorStore.open(path, FP) as s:
        with pytest.raises(InvalidInputError, match=r"not one key: store.delete\(\['"):
            s.delete(key(0))  # a string is an iterable of one-letter "keys"
        with pytest.raises(InvalidInputError, match="non-empty strings"):
            s.delete([key(0), ""])
        assert s.delete([]) == 0 and s.delete(iter([key(0)])) == 1
        assert len(s) == 2


def test_a_delete_that_fails_midway_deletes_nothing(tmp_path):
    path = _store(tmp_path / "s", 4)
    with AnchorStore.open(path, FP) as s:
        # The index fills up while the third row is deleted: the first two must come back.
        s._conn.execute(f"CREATE TEMP TRIGGER full BEFORE DELETE ON entries WHEN old.key = '{key(2)}' "
                        "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
        with pytest.raises(StoreWriteError, match="nothing was deleted.*disk is full") as info:
            s.delete([key(0), key(1), key(2)])
        assert info.value.errno == errno.ENOSPC
        assert len(s) == 4 and all(key(i) in s for i in range(4))
        s._conn.execute("DROP TRIGGER full")
        assert s.delete([key(0), key(1), key(2)]) == 3 and s.keys() == [key(3)]


# -- kill -9 ------------------------------------------------------------------------------------


def _delete_pausing_before_commit(path, marker) -> int:
    """Child process: delete entries 0..9, stopping inside the transaction, before its COMMIT, until killed."""
    with AnchorStore.open(path, FP) as s:
        def before(statement: str) -> None:
            if statement.strip().upper() == "COMMIT":
                Path(marker).touch()
                time.sleep(60)

        s._conn.set_trace_callback(before)
        s.delete([key(i) for i in range(10)])
    return 0


def test_kill_9_inside_the_delete_transaction_deletes_nothing(tmp_path):
    path = _store(tmp_path / "s", 12)
    marker = tmp_path / "in-transaction"
    child = _spawn("_delete_pausing_before_commit", path, marker)
    deadline = time.monotonic() + 60
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.exists(), child.communicate()[1]
    with sqlite3.connect(path / "index.sqlite") as db:  # a reader meanwhile still sees every entry
        assert db.execute("SELECT COUNT(*) FROM entries").fetchone() == (12,)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    with AnchorStore.open(path, FP) as s:
        report = s.verify()
        assert report.ok and report.entries == 12 and report.orphan_bytes == 0, report.summary()
        for i in range(12):
            assert_same_kv(s.get(key(i)), make_kv(i))


GROUPS, GROUP = 3, 40  # entries 0..119: three groups that a child deletes and restores in turn


def _delete_and_restore(path, ready) -> int:
    """Child process: delete a group of entries, store it again, next group ... until killed."""
    torch.set_num_threads(1)
    groups = [[(key(i), make_kv(i), {"i": i}) for i in range(g * GROUP, (g + 1) * GROUP)] for g in range(GROUPS)]
    with AnchorStore.open(path, FP) as s:
        s.put_many([item for group in groups for item in group])  # the group a kill left deleted
        Path(ready).touch()
        for cycle in range(10**6):
            group = groups[cycle % GROUPS]
            assert s.delete([k for k, _, _ in group]) == GROUP
            assert s.put_many(group) == GROUP
            if cycle % 7 == 6:
                s.gc()
    return 0


def test_kill_9_at_random_moments_of_deletes_leaves_whole_groups_and_a_verifying_store(tmp_path):
    path = _store(tmp_path / "s", GROUPS * GROUP)
    rng = random.Random(7)
    partial_at_kill = 0
    for attempt in range(12):
        ready = tmp_path / f"ready-{attempt}"
        child = _spawn("_delete_and_restore", path, ready)
        deadline = time.monotonic() + 60
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.4))
        assert child.poll() is None, child.communicate()[1]  # still deleting and restoring when killed
        child.send_signal(signal.SIGKILL)
        child.communicate()
        with AnchorStore.open(path, FP, readonly=True, cache_bytes=0) as s:
            report = s.verify()
            assert report.ok, report.summary()
            present = set(s.keys())
            partial_at_kill += len(present) < GROUPS * GROUP
            for g in range(GROUPS):
                found = sum(key(i) in present for i in range(g * GROUP, (g + 1) * GROUP))
                assert found in (0, GROUP), f"kill {attempt}: {found} of group {g}'s {GROUP} entries left"
            assert len(present) >= (GROUPS - 1) * GROUP  # at most the group in flight is missing
            for k in present:
                assert_same_kv(s.get(k), make_kv(s.metadata(k)["i"]))
    assert partial_at_kill, "no kill landed between a delete and its restore: the test proves nothing"
    with AnchorStore.open(path, FP, cache_bytes=0) as s:
        s.put_many([(key(i), make_kv(i), {"i": i}) for i in range(GROUPS * GROUP)])
        s.gc()
        report = s.verify()
        assert report.ok and report.entries == GROUPS * GROUP and report.orphan_bytes == 0, report.summary()


# -- next to readers ----------------------------------------------------------------------------


def test_reads_next_to_deletes_and_gc_get_the_right_entry_or_not_found_never_corruption(tmp_path):
    path = _store(tmp_path / "s", 16, shard_bytes=40_000)
    doomed = [key(i) for i in range(0, 16, 2)]
    stop, problems, reads = threading.Event(), [], []

    def read(cache_bytes: int) -> None:
        with AnchorStore.open(path, FP, readonly=True, cache_bytes=cache_bytes) as s:
            while not stop.is_set():
                for i in range(16):
                    try:
                        assert_same_kv(s.get(key(i)), make_kv(i))
                        reads.append(i)
                    except EntryNotFoundError:
                        if key(i) not in doomed:
                            problems.append(f"entry {i} was never deleted, yet not found")
                    except (StoreCorruptionError, AssertionError) as err:
                        problems.append(f"entry {i}: {err!r}")

    readers = [threading.Thread(target=read, args=(cache,)) for cache in (0, 1 << 20)]
    for reader in readers:
        reader.start()
    try:
        with AnchorStore.open(path, FP) as writer:
            for _ in range(8):
                assert writer.delete(doomed) == len(doomed)
                writer.gc()
                writer.put_many([(key(i), make_kv(i)) for i in range(0, 16, 2)])
                writer.gc()
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert not problems, problems[:5]
    assert len(reads) > 16


def test_verify_next_to_a_delete_and_gc_counts_what_is_left_and_reports_no_corruption(tmp_path, monkeypatch):
    path = _store(tmp_path / "s", 6)
    with AnchorStore.open(path, FP) as writer, AnchorStore.open(path, FP, readonly=True, cache_bytes=0) as reader:
        listed = reader._rows_in_place_order

        def listed_then_deleted(page=512):
            rows = list(listed(page))  # verify lists the rows, then the entries go, and gc removes their shard
            writer.delete([key(1), key(4)])
            writer.gc()
            yield from rows

        monkeypatch.setattr(reader, "_rows_in_place_order", listed_then_deleted)
        report = reader.verify()
        assert report.ok and report.entries == 4 and report.orphan_bytes == 0, report.summary()


def test_merge_skips_an_entry_deleted_from_a_source_while_merging(tmp_path, monkeypatch):
    source = _store(tmp_path / "src", 5)
    copied = store_module._copied_record

    def deleted_first(src, row):
        if row.key == key(2):
            with AnchorStore.open(source, FP) as writer:
                writer.delete([key(2)])
                writer.gc()
        return copied(src, row)

    monkeypatch.setattr(store_module, "_copied_record", deleted_first)
    assert merge(tmp_path / "dest", [source]) == 4
    with AnchorStore.open(tmp_path / "dest", FP, readonly=True) as s:
        assert sorted(s.keys()) == sorted(key(i) for i in (0, 1, 3, 4)) and s.verify().ok


# -- command line -------------------------------------------------------------------------------


def test_cli_prune_keeps_the_listed_keys_reclaims_the_rest_and_refuses_an_empty_or_foreign_list(tmp_path, capsys):
    path = _store(tmp_path / "s", 5)
    keep = tmp_path / "keep.txt"
    keep.write_text(f"{key(1)}\n\n  {key(3)}  \n{key(99)}\n")  # blank lines, spaces, unknown keys: fine
    run = subprocess.run([sys.executable, "-m", "sac_rag.store", "prune", str(path), "--keep", str(keep)],
                         capture_output=True, text=True, cwd=REPO, check=False)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert (report["deleted"], report["entries"], report["reclaimed_bytes"]) == (3, 2, 3 * ENTRY_BYTES)
    with AnchorStore.open(path, FP, readonly=True) as s:
        assert sorted(s.keys()) == sorted([key(1), key(3)]) and s.verify().ok
        assert s.stats()["orphan_bytes"] == 0

    for listing, refusal in (("\n \n", "lists no key"), (f"{key(0)}\n", "lists none of the 2 keys")):
        keep.write_text(listing)
        assert main(["prune", str(path), "--keep", str(keep)]) == 2
        assert refusal in capsys.readouterr().err
    assert main(["prune", str(path), "--keep", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read the keys file" in capsys.readouterr().err
    with AnchorStore.open(path, FP, readonly=True) as s:
        assert len(s) == 2  # nothing deleted by the refused runs
    with pytest.raises(SystemExit) as info:
        main(["prune", "--help"])
    assert info.value.code == 0 and "KEYS_FILE" in capsys.readouterr().out


def test_cli_prune_refuses_lines_that_are_not_keys_and_keys_lists_what_to_keep(tmp_path, capsys):
    """A chunk id or a key prefix in the keys file would match nothing, and the entry it was meant
    to keep would go: refused, naming the line, before anything is deleted. ``keys`` lists every
    entry's key beside its chunk id, to pick the keys from."""
    path = tmp_path / "s"
    with AnchorStore.create(path, FP, ratio=5) as s:
        s.put_many([(key(i), make_kv(i), {"chunk_id": f"doc.md#{i}", "doc_id": "doc.md"}) for i in range(3)]
                   + [("my-own-key", make_kv(9), {})])
    assert main(["keys", str(path)]) == 0
    listed = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert sorted(listed) == sorted([[key(i), f"doc.md#{i}", "doc.md"] for i in range(3)] + [["my-own-key", "", ""]])
    keep = tmp_path / "keep.txt"
    for line in ("doc.md#1", key(1)[:8]):
        keep.write_text(f"{key(0)}\n{line}\n")
        assert main(["prune", str(path), "--keep", str(keep)]) == 2
        assert f"line 2: {line!r}" in capsys.readouterr().err
    with AnchorStore.open(path, FP, readonly=True) as s:
        assert len(s) == 4  # nothing deleted by the refused runs
    keep.write_text(f"{key(0)}\nmy-own-key\n{key(7)}\n")  # a key of the store, whatever its shape; another store's
    assert main(["prune", str(path), "--keep", str(keep)]) == 0
    with AnchorStore.open(path, FP, readonly=True) as s:
        assert sorted(s.keys()) == sorted([key(0), "my-own-key"])
