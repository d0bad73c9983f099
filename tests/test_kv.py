"""Specification of ``sac_rag.kv.AnchorKV``: safetensors bytes (and what is not one), dtype and
device conversion, and moving a chunk to another offset (``at_offset``)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from sac_rag.errors import InvalidInputError
from sac_rag.kv import FORMAT, AnchorKV, read_metadata
from sac_rag.rope import KeyRotator

FP = "smollm2-135m@abc123/sac-def456"
LAYERS, HEADS, ANCHORS, DIM = 3, 2, 4, 16
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, DIM, 2, dtype=torch.float64) / DIM))


def make_kv(dtype=torch.float32, offset=0, seed=0) -> AnchorKV:
    g = torch.Generator().manual_seed(seed)
    return AnchorKV(
        keys=torch.randn(LAYERS, HEADS, ANCHORS, DIM, generator=g).to(dtype),
        values=torch.randn(LAYERS, HEADS, ANCHORS, DIM, generator=g).to(dtype),
        positions=torch.arange(2, 5 * ANCHORS, 5) + offset,
        n_tokens=5 * ANCHORS, offset=offset, fingerprint=FP,
    )


def rotator() -> KeyRotator:
    return KeyRotator(torch.stack([INV_FREQ, INV_FREQ * 0.5, torch.zeros_like(INV_FREQ)]))


def assert_same(a: AnchorKV, b: AnchorKV) -> None:
    assert a.keys.dtype == b.keys.dtype and a.values.dtype == b.values.dtype
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert torch.equal(a.positions, b.positions) and a.positions.dtype == torch.int64
    assert (a.n_tokens, a.offset, a.fingerprint) == (b.n_tokens, b.offset, b.fingerprint)


# -- bytes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bytes_round_trip_exactly_in_each_dtype(dtype):
    kv = make_kv(dtype, offset=11)
    data = kv.to_bytes()
    assert_same(AnchorKV.from_bytes(data), kv)
    assert read_metadata(data)["format"] == FORMAT
    assert AnchorKV.from_bytes(bytearray(data)).keys.dtype == dtype  # any bytes-like object
    assert_same(AnchorKV.from_bytes(memoryview(data)), kv)


def test_bytes_of_a_non_contiguous_or_grad_tracking_kv_round_trip():
    kv = make_kv()
    strided = AnchorKV(keys=kv.keys.transpose(2, 3).contiguous().transpose(2, 3).requires_grad_(True),
                       values=kv.values, positions=kv.positions.to(torch.int32), n_tokens=kv.n_tokens,
                       offset=0, fingerprint=FP)
    back = AnchorKV.from_bytes(strided.to_bytes())
    assert torch.equal(back.keys, kv.keys) and back.positions.dtype == torch.int64


def test_every_truncation_of_a_blob_is_a_clear_error():
    # Before: a cut inside the tensor data raised safetensors' own SafetensorError.
    data = make_kv().to_bytes()
    for cut in sorted({0, 1, 7, 8, 9, 50, len(data) // 2, len(data) - 8, len(data) - 1}):
        with pytest.raises(InvalidInputError, match="safetensors|truncated"):
            AnchorKV.from_bytes(data[:cut])


def _header_blob(header) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text


@pytest.mark.parametrize("blob,match", [
    (b"", "too short"),
    (b"hello world, this is plain text and not safetensors", "header length"),
    (pickle.dumps({"keys": [1, 2, 3]}), "header length"),
    ((2**63).to_bytes(8, "little") + b"{}", "header length"),
    ((4).to_bytes(8, "little") + b"\xff\xfe{}", "corrupt safetensors header"),
    (_header_blob([1, 2]), "not a JSON object"),  # before: AttributeError
    (_header_blob({"__metadata__": "x"}), "__metadata__"),  # before: AttributeError
    (_header_blob({"__metadata__": {"format": "other/1"}}), "not an AnchorKV blob"),
    (st_save({"w": torch.ones(2)}), "not an AnchorKV blob"),
], ids=["empty", "text", "pickle", "huge-header", "bad-utf8", "json-list", "meta-str", "other-format",
        "foreign-safetensors"])
def test_foreign_bytes_are_refused_with_a_clear_error(blob, match):
    with pytest.raises(InvalidInputError, match=match):
        AnchorKV.from_bytes(blob)


def test_a_blob_that_claims_the_format_but_lacks_parts_is_refused_naming_them():
    # Before: KeyError('values'), KeyError('n_tokens'), ValueError from int().
    kv = make_kv()
    meta = {"format": FORMAT, "n_tokens": "20", "offset": "0", "fingerprint": FP}
    tensors = {"keys": kv.keys, "values": kv.values, "positions": kv.positions}
    without_values = {k: v for k, v in tensors.items() if k != "values"}
    with pytest.raises(InvalidInputError, match="without values"):
        AnchorKV.from_bytes(st_save(without_values, metadata=meta))
    with pytest.raises(InvalidInputError, match="without n_tokens, offset, fingerprint"):
        AnchorKV.from_bytes(st_save(tensors, metadata={"format": FORMAT}))
    with pytest.raises(InvalidInputError, match="must be integers"):
        AnchorKV.from_bytes(st_save(tensors, metadata={**meta, "n_tokens": "twenty"}))
    with pytest.raises(InvalidInputError, match="positions"):
        AnchorKV.from_bytes(st_save({**tensors, "positions": kv.positions.float()}, metadata=meta))
    with pytest.raises(InvalidInputError, match="matching shapes"):
        AnchorKV.from_bytes(st_save({**tensors, "values": kv.values[:, :, :2].contiguous()}, metadata=meta))


@pytest.mark.parametrize("bad", ["a string", None, 12, [1, 2]])
def test_from_bytes_refuses_what_is_not_bytes(bad):
    with pytest.raises(InvalidInputError, match="expected the bytes"):
        AnchorKV.from_bytes(bad)


# -- dtype and device --------------------------------------------------------------------------


def test_to_converts_keys_and_values_and_keeps_positions_int64():
    kv = make_kv()
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        moved = kv.to("cpu", dtype)
        assert moved.keys.dtype == moved.values.dtype == dtype
        assert torch.equal(moved.positions, kv.positions) and moved.positions.dtype == torch.int64
        assert (moved.n_tokens, moved.offset, moved.fingerprint) == (kv.n_tokens, kv.offset, kv.fingerprint)
        assert torch.equal(moved.to(dtype=torch.float32).keys, kv.keys.to(dtype).float())
    assert kv.to().keys.dtype == torch.float32
    assert kv.to(torch.device("cpu")).keys.device.type == "cpu"
    assert kv.nbytes == 2 * LAYERS * HEADS * ANCHORS * DIM * 4
    assert kv.to(dtype=torch.bfloat16).nbytes == kv.nbytes // 2


@pytest.mark.parametrize("bad", [torch.int8, torch.int64, torch.bool, "auto"])
def test_to_refuses_non_floating_dtypes(bad):
    # Before: kv.to(dtype=torch.int8) truncated every K/V value silently.
    with pytest.raises(InvalidInputError, match="floating-point"):
        make_kv().to(dtype=bad)


def test_to_takes_a_dtype_by_its_name_as_everywhere():
    kv = make_kv()
    assert kv.to(dtype="float16").keys.dtype == kv.to(dtype="fp16").values.dtype == torch.float16
    assert kv.to(dtype="bfloat16").keys.dtype == torch.bfloat16
    with pytest.raises(InvalidInputError, match="not supported"):
        kv.to(dtype="half-ish")


# -- at_offset ---------------------------------------------------------------------------------


def test_at_offset_composes_and_returns_to_where_it_was():
    kv, rot = make_kv(), rotator()
    direct = kv.at_offset(1000, rot)
    stepwise = kv.at_offset(300, rot).at_offset(1000, rot)
    torch.testing.assert_close(stepwise.keys, direct.keys, rtol=1e-5, atol=1e-5)
    assert torch.equal(stepwise.positions, direct.positions)
    assert torch.equal(direct.positions, kv.positions + 1000) and direct.offset == 1000
    assert torch.equal(direct.values, kv.values)  # values carry no position
    assert torch.equal(direct.keys[2], kv.keys[2])  # a layer without RoPE stays as it is
    back = direct.at_offset(0, rot)
    torch.testing.assert_close(back.keys, kv.keys, rtol=1e-5, atol=1e-5)
    assert torch.equal(back.positions, kv.positions) and back.offset == 0
    assert kv.at_offset(0, rot) is kv  # no move, no copy
    assert (direct.n_tokens, direct.fingerprint) == (kv.n_tokens, kv.fingerprint)


def test_at_offset_of_a_bfloat16_chunk_keeps_its_dtype_and_rotates_exactly_as_float32():
    kv, rot = make_kv(torch.bfloat16), rotator()
    moved = kv.at_offset(77, rot)
    assert moved.keys.dtype == torch.bfloat16
    reference = kv.to(dtype=torch.float32).at_offset(77, rot).keys.to(torch.bfloat16)
    assert torch.equal(moved.keys, reference)


def test_at_offset_rotation_preserves_key_norms_and_relative_angles():
    kv, rot = make_kv(), rotator()
    moved = kv.at_offset(12345, rot)
    torch.testing.assert_close(moved.keys.norm(dim=-1), kv.keys.norm(dim=-1), rtol=1e-5, atol=1e-5)
    # Moving keys and a query by the same amount leaves their dot products unchanged (RoPE).
    query = make_kv(seed=1)
    before = (kv.keys * query.keys).sum(-1)
    after = (moved.keys * query.at_offset(12345, rot).keys).sum(-1)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_at_offset_accepts_integer_types_and_refuses_other_offsets():
    kv, rot = make_kv(), rotator()
    assert kv.at_offset(np.int64(5), rot).offset == 5
    assert kv.at_offset(torch.tensor(5), rot).offset == 5
    assert type(kv.at_offset(np.int64(5), rot).offset) is int
    # Before: a float offset gave float positions; a negative one, negative positions.
    for bad in (2.5, "3", None, True, -1):
        with pytest.raises(InvalidInputError, match="offset"):
            kv.at_offset(bad, rot)


def test_shapes_are_checked_when_built():
    kv = make_kv()
    with pytest.raises(InvalidInputError, match="matching shapes"):
        AnchorKV(keys=kv.keys[0], values=kv.values[0], positions=kv.positions, n_tokens=1, offset=0,
                 fingerprint=FP)
    with pytest.raises(InvalidInputError, match="positions"):
        AnchorKV(keys=kv.keys, values=kv.values, positions=kv.positions[:2], n_tokens=1, offset=0,
                 fingerprint=FP)


# -- properties (found by the audit: each failed before its fix) -------------------------------


def same_blob(a: bytes, b: bytes) -> bool:
    """The same header (metadata, tensor dtypes, shapes, offsets) and tensor bytes. (safetensors
    writes the metadata's entries in an order that varies from call to call, so two blobs of one
    AnchorKV may differ in that order alone.)"""
    def split(data: bytes) -> tuple[dict, bytes]:
        end = 8 + int.from_bytes(data[:8], "little")
        return json.loads(data[8:end]), data[end:]
    return split(a) == split(b)


@pytest.mark.parametrize("bad", [3.0, 2.5, "3", None, True, torch.tensor(3.0)])
def test_n_tokens_and_offset_must_be_integers_when_built(bad):
    # Before: AnchorKV(n_tokens=3.0) was accepted; its bytes said n_tokens '3.0', which from_bytes
    # (and a store's read) refused: a native store wrote an entry it then reported as corrupt.
    kv = make_kv()
    for name in ("n_tokens", "offset"):
        with pytest.raises(InvalidInputError, match=name):
            AnchorKV(**{"keys": kv.keys, "values": kv.values, "positions": kv.positions, "n_tokens": 20,
                        "offset": 0, "fingerprint": FP, name: bad})


def test_integer_n_tokens_and_offset_of_any_integer_type_round_trip_as_int():
    # Before: a 0-d tensor n_tokens was written as 'tensor(20)' and the blob did not read back.
    kv = make_kv()
    for n_tokens, offset in ((np.int64(20), np.int32(0)), (torch.tensor(20), torch.tensor(0))):
        built = AnchorKV(keys=kv.keys, values=kv.values, positions=kv.positions, n_tokens=n_tokens,
                         offset=offset, fingerprint=FP)
        assert type(built.n_tokens) is int and type(built.offset) is int
        assert same_blob(built.to_bytes(), kv.to_bytes())  # as plain ints write
        assert_same(AnchorKV.from_bytes(built.to_bytes()), kv)


def test_keys_and_values_sharing_memory_serialize():
    # Before: safetensors' RuntimeError "Some tensors share memory" (also from a native store's put).
    kv = make_kv()
    same = AnchorKV(keys=kv.keys, values=kv.keys, positions=kv.positions, n_tokens=20, offset=0, fingerprint=FP)
    separate = AnchorKV(keys=kv.keys, values=kv.keys.clone(), positions=kv.positions, n_tokens=20, offset=0,
                        fingerprint=FP)
    assert same_blob(same.to_bytes(), separate.to_bytes())
    assert_same(AnchorKV.from_bytes(same.to_bytes()), separate)
    both = torch.randn(3, LAYERS, HEADS, ANCHORS, DIM)  # overlapping views of one buffer
    overlapping = AnchorKV(keys=both[:2].reshape(2 * LAYERS, HEADS, ANCHORS, DIM),
                           values=both[1:].reshape(2 * LAYERS, HEADS, ANCHORS, DIM),
                           positions=kv.positions, n_tokens=20, offset=0, fingerprint=FP)
    back = AnchorKV.from_bytes(overlapping.to_bytes())
    assert torch.equal(back.keys, both[:2].reshape(-1, HEADS, ANCHORS, DIM))
    assert torch.equal(back.values, both[1:].reshape(-1, HEADS, ANCHORS, DIM))


def test_a_blob_with_integer_kv_or_keys_of_another_dtype_than_recorded_is_refused():
    # Before: a header whose "F32" became "I32" (same size) read back as integer K/V, which no
    # AnchorKV holds (``to`` refuses integer dtypes).
    kv = make_kv()
    data = kv.to_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = data[8:8 + header_len]
    assert header.count(b'"F32"') == 2
    for damaged in (header.replace(b'"F32"', b'"I32"', 1), header.replace(b'"F32"', b'"I32"')):
        with pytest.raises(InvalidInputError, match="int32"):
            AnchorKV.from_bytes(data[:8] + damaged + data[8 + header_len:])
    meta = {"format": FORMAT, "n_tokens": "20", "offset": "0", "fingerprint": FP, "dtype": "float32"}
    tensors = {"keys": kv.keys.to(torch.float16), "values": kv.values.to(torch.float16), "positions": kv.positions}
    with pytest.raises(InvalidInputError, match="float16.*float32"):
        AnchorKV.from_bytes(st_save(tensors, metadata=meta))


def test_random_kv_round_trip_exactly_property():
    g = torch.Generator().manual_seed(1234)
    rng = np.random.default_rng(1234)
    for _ in range(60):
        layers, heads, anchors, dim = (int(v) for v in rng.integers(1, 5, size=4))
        anchors = int(rng.integers(0, 6))
        dtype = [torch.float32, torch.bfloat16, torch.float16, torch.float64][int(rng.integers(4))]
        offset = int(rng.integers(0, 10**6))
        kv = AnchorKV(keys=torch.randn(layers, heads, anchors, dim, generator=g).to(dtype),
                      values=torch.randn(layers, heads, anchors, 2 * dim, generator=g).to(dtype),
                      positions=torch.randperm(50, generator=g)[:anchors].sort().values + offset,
                      n_tokens=50, offset=offset, fingerprint=f"{FP}-é{int(rng.integers(100))}")
        data = kv.to_bytes()
        assert_same(AnchorKV.from_bytes(data), kv)
        assert AnchorKV.from_bytes(data).values.shape == kv.values.shape
        for cut in rng.integers(0, len(data), size=5):
            with pytest.raises(InvalidInputError):
                AnchorKV.from_bytes(data[: int(cut)])
