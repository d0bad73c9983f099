"""Specification of the anchor store (``sac_rag.store``): persistence, integrity, crash safety,
concurrency, 8-bit storage, maintenance and merging. No model needed: entries are random K/V.

Some tests run helper functions of this module in child processes (``_spawn``), so that a
writer can be killed with SIGKILL or run next to readers in other processes.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load

from sac_rag import store as store_module
from sac_rag.errors import FingerprintMismatchError, InvalidInputError
from sac_rag.kv import AnchorKV
from sac_rag.store import (
    AnchorStore,
    EntryNotFoundError,
    NotAStoreError,
    StoreCorruptionError,
    StoreRecoveryNeededError,
    StoreWriteError,
    main,
    merge,
)

FP = "smollm2-135m@abc123/sac-def456"
OTHER_FP = "smollm2-135m@abc123/sac-999999"
FULL = (30, 3, 102, 64)  # SmolLM2-135M geometry, 510 tokens at ratio 5
SMALL = (4, 2, 16, 32)
REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def make_kv(seed: int, shape=SMALL, fingerprint: str = FP, dtype=torch.bfloat16) -> AnchorKV:
    """A deterministic random entry: the same seed always gives the same tensors."""
    g = torch.Generator().manual_seed(int(seed))
    layers, heads, anchors, dim = shape
    return AnchorKV(
        keys=torch.randn(layers, heads, anchors, dim, generator=g).to(dtype),
        values=torch.randn(layers, heads, anchors, dim, generator=g).to(dtype),
        positions=torch.arange(2, 5 * anchors, 5),
        n_tokens=5 * anchors,
        offset=0,
        fingerprint=fingerprint,
    )


def key(i: int) -> str:
    return AnchorStore.key_for(f"chunk number {i}")


def assert_same_kv(got: AnchorKV, expected: AnchorKV) -> None:
    assert got.keys.dtype == expected.keys.dtype
    assert torch.equal(got.keys, expected.keys)
    assert torch.equal(got.values, expected.values)
    assert torch.equal(got.positions, expected.positions)
    assert (got.n_tokens, got.offset, got.fingerprint) == (
        expected.n_tokens, expected.offset, expected.fingerprint)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def shard_files(path: Path) -> list[Path]:
    return sorted((path / "shards").glob("*.shard"))


def flip_byte(file: Path, position: int) -> None:
    with open(file, "r+b") as f:
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture
def store(tmp_path):
    with AnchorStore.create(tmp_path / "store", FP, ratio=5) as s:
        yield s


# -- child processes --------------------------------------------------------------------------


def _spawn(function: str, *args, module: str = "test_store") -> subprocess.Popen:
    """Run ``function(*args)`` of the test module ``module`` in a fresh Python process."""
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import {module}; "
            f"sys.exit({module}.{function}(*sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _write_entries(path, start, stop, batch, wait_for="", pause="0") -> int:
    """Child process: write entries start..stop-1 in batches (a rerun skips stored ones)."""
    torch.set_num_threads(1)
    deadline = time.monotonic() + 60
    while wait_for and not Path(wait_for).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    with AnchorStore.open(path, FP) as s:
        start, stop, batch = int(start), int(stop), int(batch)
        for first in range(start, stop, batch):
            ids = range(first, min(first + batch, stop))
            s.put_many([(key(i), make_kv(i), {"i": i}) for i in ids])
            time.sleep(float(pause))
    return 0


def _read_until(path, n, ready_file="", store=None) -> int:
    """Reader (child process or thread): re-read every visible entry, again and again, until
    all ``n`` were seen; each read must equal what the writer generated for that key."""
    torch.set_num_threads(1)
    own = store is None
    s = AnchorStore.open(path, FP, readonly=True, cache_bytes=0) if own else store
    if ready_file:
        Path(ready_file).touch()
    deadline = time.monotonic() + 120
    seen: set[str] = set()
    try:
        while len(seen) < int(n):
            if time.monotonic() > deadline:
                raise TimeoutError(f"saw only {len(seen)} of {n} entries")
            for k in s:
                assert_same_kv(s.get(k), make_kv(s.metadata(k)["i"]))
                seen.add(k)
            time.sleep(0.002)
    finally:
        if own:
            s.close()
    return 0


# -- basic behaviour --------------------------------------------------------------------------


def test_put_then_get_returns_identical_kv(store):
    kv = make_kv(1, FULL)
    assert kv.n_tokens == 510 and torch.equal(kv.positions, torch.arange(2, 510, 5))
    assert store.put(key(1), kv, {"chunk_id": "doc-1#0"}) is True
    assert_same_kv(store.get(key(1)), kv)
    assert store.metadata(key(1)) == {"chunk_id": "doc-1#0"}
    assert key(1) in store and key(2) not in store and len(store) == 1


def test_reopened_store_returns_same_entries(tmp_path):
    path = tmp_path / "store"
    with AnchorStore.create(path, FP, ratio=5) as s:
        s.put_many([(key(i), make_kv(i), {"i": i}) for i in range(5)])
    with AnchorStore.open(path, FP) as s:
        assert s.keys() == [key(i) for i in range(5)]
        assert len(s) == 5
        for i, got in enumerate(s.get_many([key(i) for i in range(5)])):
            assert_same_kv(got, make_kv(i))
            assert s.metadata(key(i)) == {"i": i}


def test_manifest_records_format_fingerprint_ratio_dtype_codec_and_position_convention(tmp_path):
    path = tmp_path / "store"
    AnchorStore.create(path, FP, ratio=8, dtype="float16", storage="fp8",
                       extra_manifest={"rope_theta": 100000}).close()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "sac-anchor-store/1"
    assert manifest["fingerprint"] == FP
    assert (manifest["ratio"], manifest["dtype"], manifest["storage"]) == (8, "float16", "fp8")
    assert "offset 0" in manifest["position_convention"]
    assert manifest["extra"] == {"rope_theta": 100000}
    assert not list(tmp_path.glob(".*creating*")), "no leftover of the atomic creation"


def test_creation_removes_what_killed_creations_left_but_not_a_creation_in_progress(tmp_path):
    import os
    import time

    from sac_rag.store import STALE_CREATION_SECONDS

    killed = tmp_path / ".store.creating-killed"  # as a creation killed before its rename leaves it
    (killed / "shards").mkdir(parents=True)
    (killed / "manifest.json").write_text("{}")
    old = time.time() - STALE_CREATION_SECONDS - 60
    os.utime(killed, (old, old))
    running = tmp_path / ".store.creating-running"  # another process creating it right now
    running.mkdir()
    other = tmp_path / ".other.creating-killed"  # another store's: not this creation's business
    other.mkdir()
    os.utime(other, (old, old))
    AnchorStore.create(tmp_path / "store", FP, ratio=5).close()
    assert not killed.exists()
    assert running.exists() and other.exists()


def test_key_for_is_sha256_of_the_chunk_text():
    import hashlib

    assert AnchorStore.key_for("héllo") == hashlib.sha256("héllo".encode()).hexdigest()
    assert AnchorStore.key_for("a") != AnchorStore.key_for("a ")


def test_key_for_refuses_text_that_is_not_valid_unicode():
    with pytest.raises(InvalidInputError, match="surrogate"):
        AnchorStore.key_for("half a pair: \ud800")


def test_put_is_idempotent_for_same_key(store):
    assert store.put(key(1), make_kv(1)) is True
    size = shard_files(store.path)[0].stat().st_size
    assert store.put(key(1), make_kv(1)) is False
    assert store.put_many([(key(1), make_kv(1)), (key(2), make_kv(2)), (key(2), make_kv(2))]) == 1
    assert len(store) == 2 and store.keys() == [key(1), key(2)]
    assert shard_files(store.path)[0].stat().st_size < 2 * size + 1


def test_update_metadata_replaces_only_stored_entries_metadata_and_leaves_their_bytes(store):
    store.put_many([(key(1), make_kv(1), {"doc_id": "a.txt"}), (key(2), make_kv(2), {"doc_id": "b.txt"})])
    shards = [f.read_bytes() for f in shard_files(store.path)]

    assert store.update_metadata({key(1): {"doc_id": "renamed.txt"}, key(2): {"doc_id": "b.txt"},
                                  key(99): {"doc_id": "never stored"}}) == 1
    assert [store.metadata(key(1)), store.metadata(key(2))] == [{"doc_id": "renamed.txt"}, {"doc_id": "b.txt"}]
    assert key(99) not in store
    assert [f.read_bytes() for f in shard_files(store.path)] == shards
    assert_same_kv(store.get(key(1)), make_kv(1))
    with AnchorStore.open(store.path, FP, readonly=True) as again:  # durable: another handle sees it
        assert again.metadata(key(1)) == {"doc_id": "renamed.txt"}
        with pytest.raises(InvalidInputError, match="read-only"):
            again.update_metadata({key(1): {}})
    with pytest.raises(InvalidInputError, match="not JSON-serializable"):
        store.update_metadata({key(1): {"doc_id": object()}})
    assert store.metadata(key(1)) == {"doc_id": "renamed.txt"}

    db = sqlite3.connect(store.path / "index.sqlite")  # a hand edit that is not a JSON object
    with db:
        db.execute("UPDATE entries SET metadata = 'see b.txt' WHERE key = ?", (key(2),))
    db.close()
    assert store.metadata(key(2)) == {"metadata": "see b.txt"}
    assert store.update_metadata({key(2): {"doc_id": "b.txt"}}) == 1 and store.metadata(key(2)) == {"doc_id": "b.txt"}


def test_get_many_keeps_the_requested_order_and_missing_keys_raise_key_error(store):
    store.put_many([(key(i), make_kv(i)) for i in range(4)])
    got = store.get_many([key(3), key(0), key(3)])
    assert_same_kv(got[0], make_kv(3))
    assert_same_kv(got[1], make_kv(0))
    with pytest.raises(KeyError):
        store.get(key(99))
    with pytest.raises(EntryNotFoundError, match=key(99)):
        store.get_many([key(0), key(99)])
    assert store.missing([key(0), key(99), key(99)]) == [key(99)]


def test_entries_decode_to_the_manifest_dtype(tmp_path):
    with AnchorStore.create(tmp_path / "s", FP, ratio=5, dtype="float16") as s:
        s.put(key(1), make_kv(1, dtype=torch.float32))
        got = s.get(key(1))
        assert got.keys.dtype == torch.float16
        assert torch.equal(got.keys, make_kv(1, dtype=torch.float32).keys.half())


def test_each_entry_in_a_shard_is_a_plain_safetensors_blob(store):
    """No pickle: the format is JSON, SQLite and safetensors, so a received store cannot run
    code; an entry cut out of its shard loads with safetensors alone."""
    store.put_many([(key(i), make_kv(i)) for i in range(3)])
    db = sqlite3.connect(store.path / "index.sqlite")
    shard, offset, length = db.execute(
        "SELECT shard, offset, length FROM entries WHERE key = ?", (key(2),)).fetchone()
    db.close()
    data = (store.path / "shards" / f"{shard:06d}.shard").read_bytes()[offset:offset + length]
    assert torch.equal(st_load(data)["keys"], make_kv(2).keys)
    assert_same_kv(AnchorKV.from_bytes(data), make_kv(2))


def test_shards_roll_over_at_the_configured_size(tmp_path):
    one = len(make_kv(0).to_bytes())
    with AnchorStore.create(tmp_path / "s", FP, ratio=5, shard_bytes=2 * one) as s:
        s.put_many([(key(i), make_kv(i)) for i in range(3)])
        s.put_many([(key(i), make_kv(i)) for i in range(3, 7)])
        assert len(shard_files(s.path)) == 4
        for i in range(7):
            assert_same_kv(s.get(key(i)), make_kv(i))
        assert s.verify().ok


def test_lru_cache_serves_repeated_gets_within_its_byte_bound(tmp_path):
    one = make_kv(0).nbytes
    path = tmp_path / "s"
    AnchorStore.create(path, FP, ratio=5).close()
    with AnchorStore.open(path, FP, cache_bytes=2 * one) as s:
        s.put_many([(key(i), make_kv(i)) for i in range(3)])
        first = s.get(key(0))
        assert s.get(key(0)) is first  # served from the cache
        s.get(key(1))
        s.get(key(2))  # evicts key(0), the least recently used
        assert s.get(key(0)) is not first
    with AnchorStore.open(path, FP, cache_bytes=0) as s:
        assert s.get(key(0)) is not s.get(key(0))


def test_a_cached_entry_another_writer_replaced_under_its_key_is_read_again(tmp_path):
    """A reader's cache serves only the bytes the index names now: another writer (here another
    handle, as another process would be) deleting a key and storing other K/V under it is seen."""
    path = tmp_path / "s"
    AnchorStore.create(path, FP, ratio=5).close()
    with AnchorStore.open(path, FP) as writer, AnchorStore.open(path, FP, readonly=True) as reader:
        writer.put(key(0), make_kv(0))
        assert_same_kv(reader.get(key(0)), make_kv(0))  # now cached by the reader
        writer.delete([key(0)])
        writer.put(key(0), make_kv(1))
        assert_same_kv(reader.get(key(0)), make_kv(1))
        assert_same_kv(reader.get_many([key(0)])[0], make_kv(1))


def test_stats_count_entries_anchors_tokens_and_bytes(store):
    store.put_many([(key(i), make_kv(i, FULL)) for i in range(3)])
    stats = store.stats()
    kv = make_kv(0, FULL)
    assert stats["entries"] == 3 and stats["shards"] == 1
    assert stats["avg_anchors_per_entry"] == 102
    assert stats["tokens_represented"] == 3 * 510
    assert stats["kv_bytes_stored"] == stats["kv_bytes_decoded"] == 3 * kv.nbytes
    assert stats["full_kv_bytes"] == 3 * kv.nbytes // 102 * 510  # 5x: the ratio
    assert stats["bytes_on_disk"] >= stats["entry_bytes"] >= stats["kv_bytes_stored"]
    assert stats["orphan_bytes"] == 0


# -- bad input --------------------------------------------------------------------------------


def test_opening_with_other_fingerprint_raises_naming_both(tmp_path):
    AnchorStore.create(tmp_path / "s", FP, ratio=5).close()
    with pytest.raises(FingerprintMismatchError) as info:
        AnchorStore.open(tmp_path / "s", OTHER_FP)
    assert FP in str(info.value) and OTHER_FP in str(info.value)
    other_base = "smollm2-135m@fff000/sac-def456"
    with pytest.raises(FingerprintMismatchError, match="fff000") as info:
        AnchorStore.open(tmp_path / "s", other_base)
    assert "in bfloat16" not in str(info.value)  # another base model: no compressor of this store's
    # A compressor of the same base model may be the store's own checkpoint in another dtype: the
    # refusal says which dtype the store was built in (float32 weights rounded are other weights).
    AnchorStore.create(tmp_path / "f32", FP, ratio=5, dtype="float32").close()
    with pytest.raises(FingerprintMismatchError, match=r"built with it in float32.*load it with dtype='float32'"):
        AnchorStore.open(tmp_path / "f32", "smollm2-135m@abc123/sac-777777")
    # The same weights under another model id (hub id vs local copy) are the same model.
    AnchorStore.open(tmp_path / "s", "/local/copy@abc123/sac-def456").close()


def test_a_store_built_by_a_built_in_compressor_is_refused_naming_that_compressor():
    """The shipped 5x and its refined variant share weights: a store of one refused by the other
    names the built-in that built it, not a dtype that would not help."""
    from sac_rag.compressor import checkpoint_meta
    from sac_rag.store import other_compressor_advice

    refined, plain = (checkpoint_meta(n)["fingerprint"] for n in ("smollm2-135m-sac-5x-refined", "smollm2-135m-sac-5x"))
    advice = other_compressor_advice(plain, refined, "bfloat16", "rebuild the store")
    assert "the built-in compressor 'smollm2-135m-sac-5x-refined'" in advice and "dtype=" not in advice
    assert "'smollm2-135m-sac-5x'" in other_compressor_advice(refined, plain, "bfloat16", "rebuild the store")


def test_directory_that_is_not_a_store_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAStoreError, match="not an anchor store"):
        AnchorStore.open(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    with pytest.raises(NotAStoreError):
        AnchorStore.open(tmp_path / "other")
    with pytest.raises(InvalidInputError, match="non-empty directory"):
        AnchorStore.create(tmp_path / "other", FP, ratio=5)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotAStoreError, match="is a file"):
        AnchorStore.open(tmp_path / "file")
    with pytest.raises(NotAStoreError, match="is a file"):
        AnchorStore.create(tmp_path / "file", FP, ratio=5)
    with pytest.raises(NotAStoreError, match="no store"):
        AnchorStore.open(tmp_path / "missing")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(NotAStoreError):
        AnchorStore.open(tmp_path / "fake")
    # An empty directory can become a store.
    AnchorStore.create(tmp_path / "empty", FP, ratio=5).close()
    AnchorStore.open(tmp_path / "empty", FP).close()


def test_put_refuses_foreign_or_malformed_entries(store):
    with pytest.raises(InvalidInputError, match="AnchorKV"):
        store.put(key(1), {"keys": torch.zeros(1)})
    with pytest.raises(FingerprintMismatchError) as info:
        store.put(key(1), make_kv(1, fingerprint=OTHER_FP))
    assert OTHER_FP in str(info.value) and FP in str(info.value)
    moved = dataclasses.replace(make_kv(1), offset=7)
    with pytest.raises(InvalidInputError, match="offset"):
        store.put(key(1), moved)
    broken = make_kv(1)
    broken.keys[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN"):
        store.put(key(1), broken)
    with pytest.raises(InvalidInputError, match="JSON"):
        store.put(key(1), make_kv(1), {"when": object()})
    with pytest.raises(InvalidInputError):
        store.put("", make_kv(1))
    assert len(store) == 0 and not shard_files(store.path)


def test_read_only_store_refuses_writes(tmp_path):
    AnchorStore.create(tmp_path / "s", FP, ratio=5).close()
    with AnchorStore.open(tmp_path / "s", FP, readonly=True) as s:
        with pytest.raises(InvalidInputError, match="read-only"):
            s.put(key(1), make_kv(1))
        with pytest.raises(InvalidInputError, match="read-only"):
            s.gc()


def test_create_with_exist_ok_reopens_only_a_matching_store(tmp_path):
    path = tmp_path / "s"
    with AnchorStore.create(path, FP, ratio=5) as s:
        s.put(key(1), make_kv(1))
    with pytest.raises(InvalidInputError, match="already exists"):
        AnchorStore.create(path, FP, ratio=5)
    with AnchorStore.create(path, FP, ratio=5, exist_ok=True) as s:
        assert key(1) in s
    with pytest.raises(InvalidInputError, match="ratio"):
        AnchorStore.create(path, FP, ratio=8, exist_ok=True)
    with pytest.raises(FingerprintMismatchError):
        AnchorStore.create(path, OTHER_FP, ratio=5, exist_ok=True)


def test_storage_none_reopens_a_store_whatever_its_storage_and_makes_a_new_one_native(tmp_path):
    with AnchorStore.create(tmp_path / "fp8", FP, ratio=5, storage="fp8") as s:
        s.put(key(1), make_kv(1))
    with AnchorStore.create(tmp_path / "fp8", FP, ratio=5, storage=None, exist_ok=True) as s:
        assert s.storage == "fp8" and key(1) in s
    with pytest.raises(InvalidInputError, match="storage='fp8', not 'int8'"):
        AnchorStore.create(tmp_path / "fp8", FP, ratio=5, storage="int8", exist_ok=True)
    with AnchorStore.create(tmp_path / "new", FP, ratio=5, storage=None) as s:
        assert s.storage == "native"


def test_keep_dtype_reopens_a_store_of_another_dtype_and_writes_in_its_own(tmp_path):
    # a store begun where the compressor computes in bfloat16, continued where it computes in float32
    path = tmp_path / "s"
    with AnchorStore.create(path, FP, ratio=5, dtype="bfloat16") as s:
        s.put(key(1), make_kv(1))
    with pytest.raises(InvalidInputError, match="dtype"):
        AnchorStore.create(path, FP, ratio=5, dtype="float32", exist_ok=True)
    with AnchorStore.create(path, FP, ratio=5, dtype="float32", exist_ok=True, keep_dtype=True) as s:
        assert s.dtype == torch.bfloat16
        s.put(key(2), make_kv(2, dtype=torch.float32))
    with AnchorStore.open(path, readonly=True) as s:
        assert s.get(key(2)).keys.dtype == torch.bfloat16
        assert torch.equal(s.get(key(2)).keys, make_kv(2, dtype=torch.float32).keys.to(torch.bfloat16))


# -- integrity --------------------------------------------------------------------------------


def test_flipped_byte_in_shard_is_detected_on_read_and_by_verify_naming_the_chunk(tmp_path):
    path = tmp_path / "s"
    with AnchorStore.create(path, FP, ratio=5) as s:
        s.put_many([(key(i), make_kv(i, FULL), {"chunk_id": f"doc-7#{i}"}) for i in range(3)])
    (shard,) = shard_files(path)
    flip_byte(shard, shard.stat().st_size // 2)  # inside the middle entry's tensor data
    with AnchorStore.open(path, FP, readonly=True) as s:
        with pytest.raises(StoreCorruptionError) as info:
            s.get(key(1))
        assert info.value.key == key(1)
        assert key(1) in str(info.value) and "doc-7#1" in str(info.value)
        assert_same_kv(s.get(key(0)), make_kv(0, FULL))
        assert_same_kv(s.get(key(2)), make_kv(2, FULL))
        with pytest.raises(StoreCorruptionError, match="doc-7#1"):
            s.get_many([key(0), key(1)])
        report = s.verify()
    assert not report.ok and report.entries == 3
    assert [b.key for b in report.bad] == [key(1)]
    assert report.bad[0].metadata == {"chunk_id": "doc-7#1"}
    assert "doc-7#1" in report.summary() and "checksum" in report.summary()


def test_truncated_shard_is_reported_as_corruption_not_a_crash(tmp_path):
    path = tmp_path / "s"
    with AnchorStore.create(path, FP, ratio=5) as s:
        s.put_many([(key(i), make_kv(i), {"i": i}) for i in range(2)])
    (shard,) = shard_files(path)
    os.truncate(shard, shard.stat().st_size - 10)
    with AnchorStore.open(path, FP) as s:
        assert_same_kv(s.get(key(0)), make_kv(0))
        with pytest.raises(StoreCorruptionError, match=key(1)):
            s.get(key(1))
        assert [b.key for b in s.verify().bad] == [key(1)]


def test_unreadable_index_or_manifest_is_reported_as_corruption(tmp_path):
    for broken in ("index.sqlite", "manifest.json"):
        path = tmp_path / broken
        AnchorStore.create(path, FP, ratio=5).close()
        (path / broken).write_bytes(b"this is not what it should be " * 100)
        with pytest.raises(StoreCorruptionError, match="unreadable"):
            AnchorStore.open(path, FP)


def test_an_emptied_index_opened_read_only_is_reported_as_corruption(tmp_path):
    path = tmp_path / "s"
    AnchorStore.create(path, FP, ratio=5).close()
    (path / "index.sqlite").write_bytes(b"")
    with pytest.raises(StoreCorruptionError, match="unreadable"):
        AnchorStore.open(path, FP, readonly=True)


def test_a_read_only_directory_reads_the_index_unless_a_stopped_writer_left_commits_in_its_wal(tmp_path,
                                                                                                monkeypatch):
    path = tmp_path / "s"
    with AnchorStore.create(path, FP, ratio=5) as s:
        s.put(key(0), make_kv(0))
    connect = sqlite3.connect

    class CannotCreateSideFiles:  # what a read-only directory does to a mode=ro connection in WAL mode
        def execute(self, *args):
            raise sqlite3.OperationalError("unable to open database file")

        def close(self):
            pass

    monkeypatch.setattr(store_module.sqlite3, "connect",
                        lambda target, *a, **k: CannotCreateSideFiles() if "mode=ro" in str(target)
                        else connect(target, *a, **k))
    with AnchorStore.open(path, FP, readonly=True) as s:
        assert s.keys() == [key(0)]
    writer = connect(path / "index.sqlite", isolation_level=None)  # a writer that stops without closing
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("INSERT INTO meta (name, value) VALUES ('uncheckpointed', '1')")
    assert (path / "index.sqlite-wal").stat().st_size > 0
    with pytest.raises(StoreRecoveryNeededError, match="open the store once with write access"):
        AnchorStore.open(path, FP, readonly=True)
    writer.close()  # the last connection merges the WAL
    with AnchorStore.open(path, FP, readonly=True) as s:
        assert s.keys() == [key(0)]


def test_verify_reads_entries_a_page_at_a_time_and_checks_each_once(tmp_path, monkeypatch):
    """verify lists the index in pages (each row holds its chunk's text) and reads every entry
    exactly once, across page ends, naming a corrupt one in a later page by its metadata."""
    path = tmp_path / "s"
    with AnchorStore.create(path, FP, ratio=5) as s:
        s.put_many([(key(i), make_kv(i), {"chunk_id": f"doc#{i}"}) for i in range(11)])
    with AnchorStore.open(path, FP, readonly=True, cache_bytes=0) as s:
        paged, read_verified, listed, read = s._rows_in_place_order, s._read_verified, [], []
        monkeypatch.setattr(s, "_rows_in_place_order", lambda page=512: (listed.append(row.key) or row
                                                                         for row in paged(4)))
        monkeypatch.setattr(s, "_read_verified", lambda row: read.append(row.key) or read_verified(row))
        tenth = sorted(s._all_places(), key=lambda row: row.offset)[9]
        (shard,) = shard_files(path)
        flip_byte(shard, tenth.offset + tenth.length // 2)
        report = s.verify()
    assert sorted(listed) == sorted(read) == sorted(key(i) for i in range(11))
    number = next(i for i in range(11) if key(i) == tenth.key)
    assert report.entries == 11 and [b.metadata for b in report.bad] == [{"chunk_id": f"doc#{number}"}]


def test_a_damaged_index_row_is_reported_as_corruption_by_reads_and_by_verify(tmp_path):
    path = tmp_path / "s"
    with AnchorStore.create(path, FP, ratio=5) as s:
        s.put_many([(key(i), make_kv(i), {"note": f"marker-{i}"}) for i in range(3)])
    index = path / "index.sqlite"
    flip_byte(index, index.read_bytes().index(b"marker-1"))  # the row's text is no longer UTF-8
    with AnchorStore.open(path, FP, readonly=True, cache_bytes=0) as s:
        assert_same_kv(s.get(key(0)), make_kv(0))
        for read in (s.get, s.metadata):
            with pytest.raises(StoreCorruptionError, match="index.sqlite"):
                read(key(1))
        report = s.verify()  # reports, does not crash
    assert not report.ok and report.index_problems
    assert "index" in report.summary() and "decode" in report.summary()


def test_verify_finds_a_damaged_key_index_that_hides_an_entry(tmp_path):
    path = tmp_path / "s"
    with AnchorStore.create(path, FP, ratio=5) as s:
        s.put_many([(key(i), make_kv(i)) for i in range(3)])
    db = sqlite3.connect(path / "index.sqlite")
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_entries_1'"
                      ).fetchone()[0]
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    data = bytearray((path / "index.sqlite").read_bytes())
    at = data.index(key(1).encode(), (root - 1) * page_size)  # the key's copy in the key index
    data[at] = ord("0") if data[at] != ord("0") else ord("1")  # still text, another key
    (path / "index.sqlite").write_bytes(bytes(data))
    with AnchorStore.open(path, FP, readonly=True, cache_bytes=0) as s:
        assert key(1) in s.keys() and key(1) not in s  # the entry cannot be found by its key
        report = s.verify()
    assert not report.ok and any("index" in p for p in report.index_problems), report.summary()


def _blob(keys, values, positions, offset=0, meta=None, **tensors) -> bytes:
    """A native entry blob built by hand (as another tool or a damaged copy might have)."""
    meta = {"format": "sac-anchor-kv/1", "n_tokens": "80", "offset": str(offset),
            "fingerprint": FP, "dtype": "bfloat16", **(meta or {})}
    return store_module.st_save({"keys": keys.contiguous(), "values": values.contiguous(),
                                 "positions": positions, **tensors}, metadata=meta)


def _smuggle(s: AnchorStore, k: str, blob: bytes, like: AnchorKV) -> None:
    """Index ``blob`` under ``k`` with a valid checksum and the index columns of ``like``."""
    import hashlib

    s._write([store_module._Record(k, blob, hashlib.sha256(blob).hexdigest(), like.n_anchors,
                                   like.n_tokens, like.nbytes, like.nbytes, 0, "{}")])


def test_entries_that_do_not_match_the_manifest_or_their_index_row_are_reported_not_returned(tmp_path):
    kv = make_kv(0)
    half = make_kv(1, shape=(4, 2, 8, 32))
    bad = {  # key -> (blob, what the error must name)
        key(1): (kv.to(dtype=torch.float32).to_bytes(), "float32"),
        key(2): (_blob(kv.keys, kv.values.float(), kv.positions), "float32"),
        key(3): (_blob(kv.keys, kv.values, kv.positions + 7, offset=7), "offset 7"),
        key(4): (half.to_bytes(), "8 anchors"),
        key(7): (make_kv(0, fingerprint=OTHER_FP).to_bytes(), "made by another compressor"),
        key(8): (dataclasses.replace(kv, n_tokens=kv.n_tokens - 1).to_bytes(), f"{kv.n_tokens - 1} tokens"),
    }
    with AnchorStore.create(tmp_path / "s", FP, ratio=5) as s:
        s.put(key(0), kv)
        for k, (blob, _) in bad.items():
            _smuggle(s, k, blob, kv)
        assert_same_kv(s.get(key(0)), kv)
        for k, (_, named) in bad.items():
            with pytest.raises(StoreCorruptionError, match=named):
                s.get(k)
        report = s.verify()
        assert sorted(b.key for b in report.bad) == sorted(bad)

    kv8 = make_kv(5)
    codes, scales = store_module.quantize(kv8.keys, "int8")
    meta = {"format": store_module.QUANTIZED_KV_FORMAT, "codec": "int8"}
    with AnchorStore.create(tmp_path / "int8", FP, ratio=5, storage="int8") as s:
        one_scale = scales[:, :1].contiguous()  # one scale for all heads of a layer
        _smuggle(s, key(5), _blob(codes, codes.clone(), kv8.positions, meta=meta, keys_scale=one_scale,
                                  values_scale=one_scale.clone()), kv8)  # (safetensors saves no shared memory)
        _smuggle(s, key(6), kv8.to_bytes(), kv8)  # a native entry in an int8 store
        for k, bad_scale in ((key(7), 0.0), (key(8), float("nan"))):  # would decode to zeros or NaN K/V
            _smuggle(s, k, _blob(codes, codes.clone(), kv8.positions, meta=meta, keys_scale=scales.clone(),
                                 values_scale=torch.full_like(scales, bad_scale)), kv8)
        with pytest.raises(StoreCorruptionError, match="scale"):
            s.get(key(5))
        with pytest.raises(StoreCorruptionError, match="holds native K/V"):
            s.get(key(6))
        for k in (key(7), key(8)):
            with pytest.raises(StoreCorruptionError, match="values_scale holds scales that are not positive"):
                s.get(k)


def test_values_beyond_the_range_of_the_store_dtype_are_refused_not_stored_as_infinity(tmp_path):
    big = make_kv(1, dtype=torch.float32)
    big.values[0, 0, 0, 0] = 1e6  # finite in float32, infinite in float16
    with AnchorStore.create(tmp_path / "s", FP, ratio=5, dtype="float16") as s:
        with pytest.raises(InvalidInputError, match="float16"):
            s.put(key(1), big)
        assert len(s) == 0
        assert s.put(key(2), make_kv(2, dtype=torch.float32))  # in range: stored


# -- crash safety -----------------------------------------------------------------------------


def test_kill_9_during_writes_leaves_a_verifiable_store(tmp_path):
    path = tmp_path / "s"
    AnchorStore.create(path, FP, ratio=5).close()
    n = 300
    for progress in (15, 60):  # kill twice, at different points of the run
        writer = _spawn("_write_entries", path, 0, n, 1)
        deadline = time.monotonic() + 60
        while writer.poll() is None and time.monotonic() < deadline:
            with AnchorStore.open(path, FP, readonly=True, cache_bytes=0) as s:
                if len(s) >= progress:
                    break
            time.sleep(0.005)
        writer.send_signal(signal.SIGKILL)
        writer.communicate()
        with AnchorStore.open(path, FP, readonly=True, cache_bytes=0) as s:
            report = s.verify()
            assert report.ok, report.summary()
    rerun = _spawn("_write_entries", path, 0, n, 7)
    _, err = rerun.communicate()
    assert rerun.returncode == 0, err
    with AnchorStore.open(path, FP, cache_bytes=0) as s:
        assert len(s) == n and sorted(s.keys()) == sorted(key(i) for i in range(n))
        report = s.verify()
        assert report.ok, report.summary()
        for i in (0, 14, 15, 16, 59, 60, 61, n - 1):
            assert_same_kv(s.get(key(i)), make_kv(i))
        s.gc()
        assert s.stats()["orphan_bytes"] == 0 and s.verify().ok
    db = sqlite3.connect(path / "index.sqlite")
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM entries").fetchone() == (n, n)
    db.close()


def test_full_disk_during_put_leaves_no_half_written_entry(tmp_path, monkeypatch):
    real_write = store_module._write_all

    def half_then_full(fd, data):
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    path = tmp_path / "s"
    with AnchorStore.create(path, FP, ratio=5) as s:
        monkeypatch.setattr(store_module, "_write_all", half_then_full)
        with pytest.raises(StoreWriteError, match="disk is full") as info:
            s.put(key(0), make_kv(0))
        assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
        assert len(s) == 0 and not shard_files(path)  # the new shard was removed again
        monkeypatch.setattr(store_module, "_write_all", real_write)
        s.put(key(0), make_kv(0))
        size = shard_files(path)[0].stat().st_size

        monkeypatch.setattr(store_module, "_write_all", half_then_full)
        with pytest.raises(StoreWriteError):
            s.put_many([(key(1), make_kv(1)), (key(2), make_kv(2))])
        assert key(1) not in s and key(2) not in s and len(s) == 1
        assert shard_files(path)[0].stat().st_size == size  # partial bytes cut off
        monkeypatch.setattr(store_module, "_write_all", real_write)
        assert s.put_many([(key(1), make_kv(1)), (key(2), make_kv(2))]) == 2  # a rerun works
    with AnchorStore.open(path, FP) as s:
        assert s.verify().ok and len(s) == 3
        assert_same_kv(s.get(key(2)), make_kv(2))


def test_failed_index_commit_leaves_only_orphan_bytes_that_gc_reclaims(tmp_path, monkeypatch):
    path = tmp_path / "s"
    with AnchorStore.create(path, FP, ratio=5) as s:
        s.put(key(0), make_kv(0))

        def full(*args):
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(AnchorStore, "_index_rows", full)
        with pytest.raises(StoreWriteError, match="nothing of this write was indexed"):
            s.put(key(1), make_kv(1))
        monkeypatch.undo()
        assert key(1) not in s
        assert s.stats()["orphan_bytes"] == len(make_kv(1).to_bytes())
        assert s.verify().ok  # orphans are not corruption
        report = s.gc()
        assert report["reclaimed_bytes"] == len(make_kv(1).to_bytes())
        assert s.stats()["orphan_bytes"] == 0
        assert s.put(key(1), make_kv(1)) is True
        assert s.verify().ok and len(s) == 2


def test_a_full_disk_while_committing_the_index_is_enospc_in_put_and_in_gc(tmp_path, monkeypatch):
    def full(*args):
        raise sqlite3.OperationalError("database or disk is full")

    path = tmp_path / "s"
    with AnchorStore.create(path, FP, ratio=5) as s:
        s.put_many([(key(i), make_kv(i)) for i in range(3)])
        with monkeypatch.context() as patch:
            patch.setattr(AnchorStore, "_index_rows", full)
            with pytest.raises(StoreWriteError, match="disk is full") as info:
                s.put(key(3), make_kv(3))
            assert info.value.errno == errno.ENOSPC
        with monkeypatch.context() as patch:
            patch.setattr(store_module, "_set_next_shard", full)  # inside gc's index transaction
            with pytest.raises(StoreWriteError, match="disk is full") as info:
                s.gc()
            assert info.value.errno == errno.ENOSPC and "gc" in str(info.value)
        assert s.verify().ok and len(s) == 3  # no entry moved or lost
        for i in range(3):
            assert_same_kv(s.get(key(i)), make_kv(i))
        s.gc()
        assert s.stats()["orphan_bytes"] == 0 and s.verify().ok


def test_gc_removes_orphans(tmp_path):
    path = tmp_path / "s"
    with AnchorStore.create(path, FP, ratio=5) as s:
        s.put_many([(key(i), make_kv(i), {"i": i}) for i in range(4)])
    (shard,) = shard_files(path)
    with open(shard, "ab") as f:  # what a writer killed before its index commit leaves
        f.write(os.urandom(1000))
    (path / "shards" / "000009.shard").write_bytes(os.urandom(500))  # a shard nobody indexes
    (path / "manifest.json.tmp").write_text("{")  # a stale temporary file
    with AnchorStore.open(path, FP) as s:
        assert s.stats()["orphan_bytes"] == 1500 and s.verify().orphan_bytes == 1500
        report = s.gc()
        assert report["reclaimed_bytes"] == 1500
        assert (report["removed_shards"], report["compacted_shards"]) == (1, 1)
        assert report["removed_temp_files"] == 1
        assert s.stats()["orphan_bytes"] == 0 and s.verify().ok
        for i in range(4):
            assert_same_kv(s.get(key(i)), make_kv(i))
        again = s.gc()
        assert again["reclaimed_bytes"] == 0 and again["compacted_shards"] == 0  # nothing left to do
        s.put(key(4), make_kv(4))
    names = [p.name for p in shard_files(path)]
    assert names and all(int(n.split(".")[0]) > 9 for n in names), "shard ids are never reused"
    with AnchorStore.open(path, FP) as s:
        assert len(s) == 5 and s.verify().ok


# -- concurrency ------------------------------------------------------------------------------


def test_two_readers_and_one_writer_concurrently_see_no_errors_or_torn_reads(tmp_path):
    path = tmp_path / "s"
    AnchorStore.create(path, FP, ratio=5, shard_bytes=40_000).close()  # several shards
    n = 60
    ready = tmp_path / "reader-ready"
    reader = _spawn("_read_until", path, n, ready)
    writer = _spawn("_write_entries", path, 0, n, 3, ready, 0.01)
    with AnchorStore.open(path, FP, readonly=True, cache_bytes=0) as shared, \
            ThreadPoolExecutor(2) as pool:
        threads = [pool.submit(_read_until, path, n, "", shared) for _ in range(2)]
        for thread in threads:
            thread.result()  # re-raises a reader's failure
    for proc in (writer, reader):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    with AnchorStore.open(path, FP) as s:
        assert len(s) == n and s.verify().ok


def test_two_writers_at_once_never_duplicate_a_key(tmp_path):
    path = tmp_path / "s"
    AnchorStore.create(path, FP, ratio=5).close()

    def write(first, last):
        with AnchorStore.open(path, FP) as s:
            for start in range(first, last, 5):
                s.put_many([(key(i), make_kv(i), {"i": i}) for i in range(start, start + 5)])

    with ThreadPoolExecutor(2) as pool:
        for writer in [pool.submit(write, 0, 40), pool.submit(write, 20, 60)]:
            writer.result()
    with AnchorStore.open(path, FP) as s:
        assert len(s) == 60 and s.verify().ok and s.stats()["orphan_bytes"] == 0


def test_gc_goes_through_every_entry_without_holding_every_entrys_metadata(tmp_path, monkeypatch):
    """Entries carry their chunk's text in their metadata: a store of millions of them must not be
    read into memory whole to find what to reclaim."""
    import sac_rag.store as store_module

    path = tmp_path / "s"
    text = "a chunk of a long document " * 40
    with AnchorStore.create(path, FP, ratio=5) as s:
        s.put_many([(key(i), make_kv(i), {"text": text, "i": i}) for i in range(6)])
        s.delete([key(2)])  # something for gc to reclaim
    rows = []
    make_row = store_module.AnchorStore._make_row
    monkeypatch.setattr(store_module.AnchorStore, "_make_row", lambda self, found: rows.append(found) or
                        make_row(self, found))
    with AnchorStore.open(path, FP) as s:
        assert s.gc()["reclaimed_bytes"] > 0
        assert len(rows) >= 5 and not any(text in str(row) for row in rows)
        assert s.verify().ok and s.metadata(key(3)) == {"text": text, "i": 3}


def test_a_write_reaches_the_disk_before_the_index_row_that_points_at_it(tmp_path, monkeypatch):
    """A power cut (which a kill does not simulate) may lose a write, never leave a row pointing at
    bytes that never reached the disk: the shard is synced before the index commits, and the index
    commits synchronously."""
    events = []
    fsync, commit = os.fsync, AnchorStore._commit_rows
    monkeypatch.setattr(store_module.os, "fsync", lambda fd: (events.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                              fsync(fd))[1])
    monkeypatch.setattr(AnchorStore, "_commit_rows", lambda self, *a, **kw: (events.append("commit"),
                                                                             commit(self, *a, **kw))[1])
    with AnchorStore.create(tmp_path / "s", FP, ratio=5) as s:
        assert s._db().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        events.clear()
        s.put(key(0), make_kv(0))
    (shard,) = shard_files(tmp_path / "s")
    assert events.index(str(shard)) < events.index("commit")


def test_gc_while_reading_keeps_every_read_correct(tmp_path):
    path = tmp_path / "s"
    with AnchorStore.create(path, FP, ratio=5) as s:
        s.put_many([(key(i), make_kv(i), {"i": i}) for i in range(20)])
    stop = threading.Event()

    def read():
        with AnchorStore.open(path, FP, readonly=True, cache_bytes=0) as r:
            while not stop.is_set():
                for k in r:
                    assert_same_kv(r.get(k), make_kv(r.metadata(k)["i"]))

    with ThreadPoolExecutor(1) as pool:
        reader = pool.submit(read)
        try:
            with AnchorStore.open(path, FP) as s:
                for _ in range(4):
                    with open(shard_files(path)[-1], "ab") as f:
                        f.write(os.urandom(100))
                    assert s.gc()["moved_entries"] == 20
                    time.sleep(0.05)
        finally:
            stop.set()
        reader.result()


@pytest.mark.parametrize("times", [1, 2])
def test_a_read_racing_gc_follows_the_moved_entry(tmp_path, monkeypatch, times):
    """The reader looks up an entry's place, then gc moves it and deletes the old shard (``times``
    over: the retry's lookup goes stale too), then the reader reads: it must find the entry at its
    new place, not report corruption."""
    path = tmp_path / "s"
    with AnchorStore.create(path, FP, ratio=5) as s:
        s.put_many([(key(i), make_kv(i)) for i in range(3)])
    writer = AnchorStore.open(path, FP)
    reader = AnchorStore.open(path, FP, readonly=True, cache_bytes=0)
    lookup = AnchorStore._row
    moved = []

    def lookup_then_gc(self, k):
        row = lookup(self, k)
        if self is reader and len(moved) < times:
            with open(shard_files(path)[-1], "ab") as f:  # orphan bytes, which gc compacts away
                f.write(os.urandom(100))
            moved.append(writer.gc()["moved_entries"])
        return row

    monkeypatch.setattr(AnchorStore, "_row", lookup_then_gc)
    try:
        assert_same_kv(reader.get(key(1)), make_kv(1))
        assert moved == [3] * times
    finally:
        writer.close()
        reader.close()


# -- 8-bit storage ----------------------------------------------------------------------------


def _native_and_8bit(tmp_path, codec):
    entries = [(key(i), make_kv(i, FULL)) for i in range(3)]
    with AnchorStore.create(tmp_path / "native", FP, ratio=5) as native:
        native.put_many(entries)
        native_bytes = native.stats()["entry_bytes"]
    small = AnchorStore.create(tmp_path / codec, FP, ratio=5, storage=codec)
    small.put_many(entries)
    return small, native_bytes


def _check_8bit_store(small: AnchorStore, native_bytes: int, bound: float, elementwise) -> None:
    with small:
        stats = small.stats()
        assert 0.49 < stats["entry_bytes"] / native_bytes < 0.51  # half of bf16
        scales = 3 * 2 * 30 * 3 * 4  # a float32 scale per [layer, head], for keys and values
        assert stats["kv_bytes_decoded"] == 2 * (stats["kv_bytes_stored"] - scales)
        for i in range(3):
            got, expected = small.get(key(i)), make_kv(i, FULL)
            assert got.keys.dtype == torch.bfloat16 and got.keys.shape == expected.keys.shape
            assert torch.equal(got.positions, expected.positions)
            assert (got.n_tokens, got.offset, got.fingerprint) == (510, 0, FP)
            for g, e in ((got.keys, expected.keys), (got.values, expected.values)):
                assert relative_error(g, e) < bound
                e = e.float()
                head_absmax = e.abs().amax(dim=(2, 3), keepdim=True)
                assert ((g.float() - e).abs() <= elementwise(e, head_absmax)).all()
        assert small.verify().ok


def test_fp8_storage_halves_bytes_and_keeps_values_close(tmp_path):
    small, native_bytes = _native_and_8bit(tmp_path, "fp8")
    # e4m3 keeps 3 mantissa bits (each value within 1/16, plus bf16 rounding of the result);
    # values below the smallest normal of the scaled range lose relative precision.
    _check_8bit_store(small, native_bytes, 0.04,
                      lambda e, absmax: e.abs() * (1 / 16 + 1 / 128) + absmax / 448 * 2**-6)


def test_int8_storage_halves_bytes_and_keeps_values_close(tmp_path):
    small, native_bytes = _native_and_8bit(tmp_path, "int8")
    # Each value within half a quantization step (absmax / 127), plus bf16 rounding.
    _check_8bit_store(small, native_bytes, 0.015,
                      lambda e, absmax: absmax / 254 + e.abs() / 128 + 1e-6)


def test_8bit_storage_keeps_an_all_zero_head_exactly_zero(tmp_path):
    kv = make_kv(0)
    kv.keys[1, 0].zero_()
    with AnchorStore.create(tmp_path / "s", FP, ratio=5, storage="int8") as s:
        s.put(key(0), kv)
        assert (s.get(key(0)).keys[1, 0] == 0).all()


# -- merging ----------------------------------------------------------------------------------


def test_merge_combines_shards_and_skips_duplicates(tmp_path):
    for name, ids in (("a", range(10)), ("b", range(5, 15))):
        with AnchorStore.create(tmp_path / name, FP, ratio=5, extra_manifest={"x": 1}) as s:
            s.put_many([(key(i), make_kv(i), {"i": i, "from": name}) for i in ids])
    assert merge(tmp_path / "all", [tmp_path / "a", tmp_path / "b"]) == 15
    assert merge(tmp_path / "all", [tmp_path / "a", tmp_path / "b"]) == 0
    with AnchorStore.open(tmp_path / "all", FP) as s:
        assert len(s) == 15 and s.verify().ok
        assert s.manifest["extra"] == {"x": 1}
        assert s.metadata(key(12)) == {"i": 12, "from": "b"}
        assert s.metadata(key(7))["from"] == "a"
        for i in range(15):
            assert_same_kv(s.get(key(i)), make_kv(i))


def test_merge_into_an_8bit_store_reencodes_entries(tmp_path):
    with AnchorStore.create(tmp_path / "a", FP, ratio=5) as s:
        s.put_many([(key(i), make_kv(i)) for i in range(3)])
    AnchorStore.create(tmp_path / "dest", FP, ratio=5, storage="fp8").close()
    assert merge(tmp_path / "dest", [tmp_path / "a"]) == 3
    with AnchorStore.open(tmp_path / "dest", FP) as s:
        assert s.verify().ok
        assert relative_error(s.get(key(1)).keys, make_kv(1).keys) < 0.04


def test_merge_into_a_store_of_another_dtype_converts_entries(tmp_path):
    with AnchorStore.create(tmp_path / "a", FP, ratio=5) as s:  # bfloat16
        s.put_many([(key(i), make_kv(i)) for i in range(3)])
    AnchorStore.create(tmp_path / "dest", FP, ratio=5, dtype="float16").close()
    assert merge(tmp_path / "dest", [tmp_path / "a"]) == 3
    with AnchorStore.open(tmp_path / "dest", FP) as s:
        assert s.verify().ok
        got = s.get(key(1))
        assert got.keys.dtype == torch.float16
        assert torch.equal(got.keys, make_kv(1).keys.to(torch.float16))


def test_merge_into_a_destination_written_with_a_tilde_adds_to_it_again(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with AnchorStore.create(tmp_path / "home" / "src", FP, ratio=5) as s:
        s.put(key(0), make_kv(0))
    assert merge("~/dest", ["~/src"]) == 1
    with AnchorStore.open(tmp_path / "home" / "src", FP) as s:
        s.put(key(1), make_kv(1))
    assert merge("~/dest", ["~/src"]) == 1  # the store at ~/dest, not a new one beside a folder named ~
    assert not (tmp_path / "~").exists()


def test_merge_refuses_stores_of_another_ratio_under_one_fingerprint(tmp_path):
    """The fingerprint names the ratio, so only hand-made stores get here; they are refused all the same."""
    for name, ratio in (("a", 5), ("b", 4), ("dest", 4)):
        with AnchorStore.create(tmp_path / name, FP, ratio=ratio) as s:
            s.put(key(ratio), make_kv(ratio))
    with pytest.raises(InvalidInputError, match="ratio 4, .* has 5; stores of different ratios cannot be merged"):
        merge(tmp_path / "new", [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(InvalidInputError, match="has ratio 4, the sources have 5"):
        merge(tmp_path / "dest", [tmp_path / "a"])
    assert not (tmp_path / "new").exists()


def test_merge_refuses_other_fingerprint(tmp_path):
    with AnchorStore.create(tmp_path / "a", FP, ratio=5) as s:
        s.put(key(0), make_kv(0))
    with AnchorStore.create(tmp_path / "b", OTHER_FP, ratio=5) as s:
        s.put(key(1), make_kv(1, fingerprint=OTHER_FP))
    with pytest.raises(FingerprintMismatchError) as info:
        merge(tmp_path / "all", [tmp_path / "a", tmp_path / "b"])
    assert FP in str(info.value) and OTHER_FP in str(info.value) and "model in use" not in str(info.value)
    assert not (tmp_path / "all").exists()  # refused before writing anything
    with pytest.raises(FingerprintMismatchError) as info:
        merge(tmp_path / "a", [tmp_path / "b"])  # into an existing store of another model
    assert str(info.value).startswith(f"the destination store at {tmp_path / 'a'} was built for {FP!r}, but the "
                                      f"compressor of the sources ({tmp_path / 'b'}) is {OTHER_FP!r}")


def test_merge_refuses_a_corrupt_source_entry(tmp_path):
    with AnchorStore.create(tmp_path / "a", FP, ratio=5) as s:
        s.put(key(0), make_kv(0), {"chunk_id": "c0"})
    flip_byte(shard_files(tmp_path / "a")[0], 1000)
    with pytest.raises(StoreCorruptionError, match="c0"):
        merge(tmp_path / "all", [tmp_path / "a"])


def test_merge_refuses_an_entry_that_does_not_match_its_index_row(tmp_path):
    with AnchorStore.create(tmp_path / "a", FP, ratio=5) as s:
        _smuggle(s, key(0), make_kv(0, shape=(4, 2, 8, 32)).to_bytes(), make_kv(0))  # checksum is fine
    with pytest.raises(StoreCorruptionError, match="8 anchors"):
        merge(tmp_path / "all", [tmp_path / "a"])


# -- command line -----------------------------------------------------------------------------


def test_cli_verify_and_stats(tmp_path, capsys):
    path = tmp_path / "s"
    with AnchorStore.create(path, FP, ratio=5) as s:
        s.put_many([(key(i), make_kv(i), {"chunk_id": f"c{i}"}) for i in range(3)])
    run = subprocess.run([sys.executable, "-m", "sac_rag.store", "stats", str(path)],
                         capture_output=True, text=True, cwd=REPO, check=False)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["entries"] == 3
    assert main(["verify", str(path)]) == 0
    assert "OK: 3 entries" in capsys.readouterr().out

    (shard,) = shard_files(path)
    flip_byte(shard, shard.stat().st_size // 2)
    run = subprocess.run([sys.executable, "-m", "sac_rag.store", "verify", str(path)],
                         capture_output=True, text=True, cwd=REPO, check=False)
    assert run.returncode == 1
    assert key(1) in run.stdout and "c1" in run.stdout

    assert main(["gc", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["reclaimed_bytes"] == 0
    assert main(["verify", str(tmp_path)]) == 2
    assert "not an anchor store" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "verify" in capsys.readouterr().out


def test_cli_merge_and_verify_show_progress_bars_counting_entries(tmp_path, capsys):
    # Both read every entry of stores that can hold a whole corpus: minutes of work, not silence.
    for name, ids in (("a", range(10)), ("b", range(5, 15))):
        with AnchorStore.create(tmp_path / name, FP, ratio=5) as s:
            s.put_many([(key(i), make_kv(i)) for i in ids])
    assert main(["merge", str(tmp_path / "all"), str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["added"] == 15
    assert "merging" in captured.err and "20/20" in captured.err  # every entry of both sources, repeats too
    assert main(["verify", str(tmp_path / "all")]) == 0
    captured = capsys.readouterr()
    assert "OK: 15 entries" in captured.out
    assert "verifying" in captured.err and "15/15" in captured.err


# -- paths and arguments as users give them ------------------------------------------------------


def test_a_store_opened_by_a_relative_path_stays_that_store_after_the_process_changes_directory(tmp_path,
                                                                                                monkeypatch):
    """Its shard files and lock were built from the path as given: after a chdir, new bytes went into
    another project's store of the same name while the index stayed here."""
    for project in ("a", "b"):
        (tmp_path / project).mkdir()
        monkeypatch.chdir(tmp_path / project)
        AnchorStore.create("corpus.store", FP, ratio=5).close()
    monkeypatch.chdir(tmp_path / "a")
    with AnchorStore.open("corpus.store", FP) as store:
        monkeypatch.chdir(tmp_path / "b")
        store.put(key(1), make_kv(1))
        assert store.path == tmp_path / "a" / "corpus.store"
        assert torch.equal(store.get(key(1)).keys, make_kv(1).keys)
    with AnchorStore.open(tmp_path / "a" / "corpus.store", readonly=True) as a:
        assert a.verify().ok and len(a) == 1
    with AnchorStore.open(tmp_path / "b" / "corpus.store", readonly=True) as b:
        assert len(b) == 0 and b.verify().orphan_bytes == 0


def test_a_store_path_with_a_tilde_is_the_home_folders_not_a_folder_named_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    AnchorStore.create("~/corpus.store", FP, ratio=5).close()
    assert (tmp_path / "home" / "corpus.store" / "manifest.json").exists() and not (tmp_path / "~").exists()
    AnchorStore.open("~/corpus.store", FP).close()


def test_a_store_path_that_links_to_an_empty_directory_makes_the_store_there(tmp_path):
    (tmp_path / "big-disk" / "corpus.store").mkdir(parents=True)
    (tmp_path / "corpus.store").symlink_to(tmp_path / "big-disk" / "corpus.store")
    AnchorStore.create(tmp_path / "corpus.store", FP, ratio=5).close()
    assert (tmp_path / "big-disk" / "corpus.store" / "manifest.json").exists()
    AnchorStore.open(tmp_path / "corpus.store", FP).close()  # read through the link
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(NotAStoreError, match=r"dangling is a symbolic link to .*nowhere, which does not exist"):
        AnchorStore.create(tmp_path / "dangling", FP, ratio=5)


@pytest.mark.parametrize("cache_bytes", [None, -1, 1.5, True])
def test_a_bad_cache_size_is_refused_before_a_store_is_made(tmp_path, cache_bytes):
    with pytest.raises(InvalidInputError, match="cache_bytes must be a whole number of bytes >= 0"):
        AnchorStore.create(tmp_path / "s", FP, ratio=5, cache_bytes=cache_bytes)
    assert not (tmp_path / "s").exists()
    AnchorStore.create(tmp_path / "s", FP, ratio=5).close()  # and nothing is in the way of the retry
    with pytest.raises(InvalidInputError, match="cache_bytes must be"):
        AnchorStore.open(tmp_path / "s", cache_bytes=cache_bytes)


def test_calls_that_take_several_keys_refuse_one_key_given_alone(tmp_path):
    """A str is iterable: missing(key) answered 16 one-character "missing keys"."""
    with AnchorStore.create(tmp_path / "s", FP, ratio=5) as store:
        store.put(key(1), make_kv(1))
        for call in (store.missing, store.get_many, store.delete):
            with pytest.raises(InvalidInputError, match=rf"{call.__name__} takes a list of keys, not one key"):
                call(key(1))
        assert store.missing([key(1), key(2)]) == [key(2)]
        with pytest.raises(InvalidInputError, match=r"update_metadata takes a mapping \{key: metadata\}"):
            store.update_metadata([key(1)])
    with pytest.raises(InvalidInputError, match="readonly must be True or False"):
        AnchorStore.open(tmp_path / "s", readonly="false")
    with pytest.raises(InvalidInputError, match="fingerprint must be a string"):
        AnchorStore.open(tmp_path / "s", fingerprint=5)


def test_a_store_whose_index_cannot_be_written_is_refused_naming_it_and_leaves_nothing(tmp_path, monkeypatch):
    """A full disk fails in SQLite ("database or disk is full", "disk I/O error"), which is no OSError:
    it came out as a bare sqlite3 traceback."""
    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store_module.sqlite3, "connect", full)
    with pytest.raises(StoreWriteError, match=r"cannot create the store at .*/s: its index could not be written "
                                              r"\(database or disk is full\); make room on the disk"):
        AnchorStore.create(tmp_path / "s", FP, ratio=5)
    assert list(tmp_path.iterdir()) == []


def test_a_store_made_with_a_numpy_integer_ratio_records_a_json_number(tmp_path):
    import numpy as np

    with AnchorStore.create(tmp_path / "s", FP, ratio=np.int64(3)) as store:
        assert store.ratio == 3 and type(store.manifest["ratio"]) is int
