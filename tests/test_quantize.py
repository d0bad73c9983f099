"""Specification of ``sac_rag.quantize``: the fp8 (e4m3) and int8 codecs with one absmax scale per
(layer, head) that 8-bit stores keep anchor K/V in. Error bounds, edge values (all-zero heads,
subnormal, huge, NaN/inf), dtypes, and the encoding of valid inputs pinned (stored entries)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from sac_rag.errors import InvalidInputError
from sac_rag.kv import AnchorKV
from sac_rag.quantize import CODECS, dequantize, quantize, round_trip
from sac_rag.store import AnchorStore

FP = "smollm2-135m@abc123/sac-def456"
TINY = 2.0**-149  # the smallest positive float32 (subnormal)
TOP = {"fp8": 448.0, "int8": 127.0}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def sample(dtype=torch.float32, seed=0, shape=(3, 4, 5, 16)) -> torch.Tensor:
    """K/V-like values: heads of very different ranges, a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-2, 2, shape[0] * shape[1]).view(shape[:2] + (1, 1))
    x[..., 3] *= 20
    return x.to(dtype)


def bound(codec: str, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest error each element may have after a round trip (decoded to float32)."""
    s = scale[:, :, None, None]
    if codec == "int8":
        return s * (0.5 + 2**-14) + TINY  # half a step, plus float32 rounding of x / scale, q * scale
    # e4m3: 3 mantissa bits (half an ulp = 2**-4 relative) for normal codes; below 2**-6 the
    # subnormal codes have a fixed step of 2**-9, so an absolute half step of 2**-10 * scale.
    return x.abs() * 2**-4 * (1 + 2**-20) + s * 2**-10 + TINY


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_stays_within_the_codec_error_bound(codec, dtype):
    x = sample(dtype)
    q, scale = quantize(x, codec)
    assert q.dtype == (torch.float8_e4m3fn if codec == "fp8" else torch.int8) and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:2]
    assert q.is_contiguous() and scale.is_contiguous()
    xf = x.float()
    torch.testing.assert_close(scale, xf.abs().amax(dim=(2, 3)) / TOP[codec], rtol=0, atol=0)
    decoded = dequantize(q, scale, torch.float32)
    assert ((decoded - xf).abs() <= bound(codec, xf, scale)).all()
    # Each head's largest value is the top code and comes back (nearly) exactly.
    assert (q.float().abs().amax(dim=(2, 3)) == TOP[codec]).all()
    top = xf.abs().amax(dim=(2, 3))
    torch.testing.assert_close(decoded.abs().amax(dim=(2, 3)), top, rtol=2**-22, atol=0)


def test_fp8_error_is_relative_and_int8_error_absolute():
    x = torch.tensor([100.0, 1.0, 0.01, -0.3]).view(1, 1, 1, 4)
    fp8 = dequantize(*quantize(x, "fp8"), torch.float32)
    int8 = dequantize(*quantize(x, "int8"), torch.float32)
    rel = ((fp8 - x).abs() / x.abs()).flatten()
    assert (rel[:2] <= 2**-4).all()  # normal fp8 codes: within 1/16 of each value
    assert (int8 - x).abs().max() <= 100 / 254 * (1 + 1e-6)
    assert int8.flatten()[2] == 0  # 0.01 is below half an int8 step of a head with absmax 100


@pytest.mark.parametrize("codec", CODECS)
def test_an_all_zero_head_gets_scale_one_and_decodes_to_exact_zeros(codec):
    x = sample()
    x[1, 2] = 0
    x[2, 0] = -0.0
    q, scale = quantize(x, codec)
    assert scale[1, 2] == 1 and scale[2, 0] == 1
    assert (q[1, 2].float() == 0).all()
    decoded = dequantize(q, scale, torch.float32)
    assert (decoded[1, 2] == 0).all() and (decoded[2, 0] == 0).all()
    assert torch.equal(quantize(sample(), codec)[1][0], scale[0])  # the other heads are untouched
    empty_q, empty_scale = quantize(torch.zeros(2, 3, 0, 8), codec)  # no anchors at all
    assert empty_q.shape == (2, 3, 0, 8) and torch.equal(empty_scale, torch.ones(2, 3))


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("magnitude", [1e-44, 3e-42, 1e-40, 1e-38, 1e-36, 1e-30])
def test_subnormal_and_tiny_values_get_a_positive_scale_and_stay_within_a_step(codec, magnitude):
    # Before: a head whose absmax / 448 (or / 127) is below float32's smallest subnormal got
    # scale 0 (x / 0 = inf codes); an 8-bit store wrote it and then refused to read it back.
    x = torch.tensor([1.0, -0.5, 0.25, 0.0, -1.0, 0.75]).view(1, 1, 2, 3) * magnitude
    q, scale = quantize(x, codec)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert (q.float().abs() <= TOP[codec]).all()
    decoded = dequantize(q, scale, torch.float32)
    assert torch.isfinite(decoded).all()
    assert ((decoded - x).abs() <= bound(codec, x, scale) + TINY).all()


@pytest.mark.parametrize("codec", CODECS)
def test_a_subnormal_head_in_an_8bit_store_reads_back(tmp_path, codec):
    keys = torch.randn(2, 2, 3, 8)
    keys[1, 1] = torch.tensor(1e-44)  # scale 1e-44 / 448 underflowed to 0 before
    kv = AnchorKV(keys=keys, values=torch.randn(2, 2, 3, 8), positions=torch.arange(3), n_tokens=3,
                  offset=0, fingerprint=FP)
    key = AnchorStore.key_for("tiny values")
    with AnchorStore.create(tmp_path / "s", FP, ratio=1, storage=codec, dtype="float32") as store:
        store.put(key, kv)
        got = store.get(key)
        assert store.verify().ok
    assert (got.keys[1, 1] - keys[1, 1]).abs().max() <= 2 * 2**-149


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", CODECS)
def test_the_largest_finite_values_of_each_dtype_round_trip_finite(codec, dtype):
    # Before: float32's largest value, quantized with int8, decoded to inf (127 * scale rounded up).
    big = torch.finfo(dtype).max
    x = torch.tensor([big, -big, big / 3, 1.0]).view(1, 1, 1, 4).to(dtype)
    q, scale = quantize(x, codec)
    assert torch.isfinite(scale).all()
    decoded = dequantize(q, scale, dtype)
    assert torch.isfinite(decoded).all()
    assert decoded.flatten()[0] == big and decoded.flatten()[1] == -big
    assert ((decoded.float() - x.float()).abs() <= bound(codec, x.float(), scale) + big * 2**-8).all()


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_infinite_values_are_refused_naming_the_head(codec, bad, dtype):
    # Before: a NaN made its head's scale 1 (codes of the raw values, int8 NaN -> 0), an
    # infinity made the scale inf and every value of the head NaN.
    x = sample(dtype)
    x[2, 1, 0, 5] = bad
    with pytest.raises(InvalidInputError, match="NaN or infinite.*layer 2, head 1"):
        quantize(x, codec)


@pytest.mark.parametrize("codec", CODECS)
def test_float64_values_beyond_float32_are_refused_not_stored_as_nan(codec):
    x = torch.ones(1, 2, 2, 2, dtype=torch.float64)
    x[0, 1, 1, 1] = 1e300
    with pytest.raises(InvalidInputError, match="beyond float32"):
        quantize(x, codec)


@pytest.mark.parametrize("codec", CODECS)
def test_dequantizes_to_each_floating_dtype(codec):
    x = sample()
    q, scale = quantize(x, codec)
    exact = q.float() * scale[:, :, None, None]
    for dtype in DTYPES + (torch.float64,):
        got = dequantize(q, scale, dtype)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got, exact.to(dtype))
    for bad in (torch.int8, torch.int64, torch.bool, torch.float8_e4m3fn, "float32", None):
        with pytest.raises(InvalidInputError, match="dtype"):
            dequantize(q, scale, bad)


def test_dequantize_refuses_what_quantize_did_not_make():
    q, scale = quantize(sample(), "int8")
    with pytest.raises(InvalidInputError, match="8-bit code"):
        dequantize(q.float(), scale, torch.float32)
    # Before: one scale per layer broadcast silently over the heads; a 1-D scale was an IndexError.
    for bad in (scale[:, :1], scale[0], scale.T, torch.ones(3)):
        with pytest.raises(InvalidInputError, match="one scale per"):
            dequantize(q, bad, torch.float32)
    with pytest.raises(InvalidInputError, match="one scale per"):
        dequantize(q[0], scale[0], torch.float32)


@pytest.mark.parametrize("bad", ["fp16", "INT8", "", None, ("int8",), ["fp8"]])
def test_unknown_codecs_are_refused(bad):
    with pytest.raises(InvalidInputError, match="unknown 8-bit codec"):
        quantize(sample(), bad)


def test_inputs_that_are_not_real_4d_tensors_are_refused():
    for bad, match in ((sample()[0], r"\[layers, heads"), (sample()[None], r"\[layers, heads"),
                       (sample().tolist(), "expected a tensor"),
                       (torch.ones(1, 1, 1, 2, dtype=torch.complex64), "complex"),
                       (torch.ones(1, 1, 1, 2, dtype=torch.bool), "bool")):
        with pytest.raises(InvalidInputError, match=match):
            quantize(bad, "int8")


@pytest.mark.parametrize("codec", CODECS)
def test_quantize_does_not_touch_its_input_or_track_gradients(codec):
    x = sample().requires_grad_(True)
    before = x.detach().clone()
    q, scale = quantize(x, codec)
    assert not q.requires_grad and not scale.requires_grad
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_keeps_everything_but_the_precision_of_keys_and_values(dtype):
    kv = AnchorKV(keys=sample(dtype, 1), values=sample(dtype, 2), positions=torch.arange(5) + 7,
                  n_tokens=25, offset=7, fingerprint=FP)
    for codec in CODECS:
        back = round_trip(kv, codec)
        assert back.keys.dtype == back.values.dtype == dtype
        assert torch.equal(back.positions, kv.positions)
        assert (back.n_tokens, back.offset, back.fingerprint) == (25, 7, FP)
        assert torch.equal(back.keys, dequantize(*quantize(kv.keys, codec), dtype))


# The codes and scales of one fixed input as the code produced them when the 8-bit stores and
# results in this repository were written: a change here changes what a store decodes.
PINNED = {"fp8": "c81f9a3a1d0e38e6", "int8": "f6dce22bc3dca2f2"}


@pytest.mark.parametrize("codec", CODECS)
def test_encoding_of_a_pinned_input_is_unchanged(codec):
    x = torch.linspace(-3, 5, 2 * 3 * 4 * 8).view(2, 3, 4, 8) ** 3
    x[1, 2] *= 1e-3
    x[0, 1] = 0
    q, scale = quantize(x.to(torch.bfloat16), codec)
    digest = hashlib.sha256(q.view(torch.uint8).numpy().tobytes() + scale.numpy().tobytes()).hexdigest()
    assert digest[:16] == PINNED[codec]


@pytest.mark.parametrize("codec", CODECS)
def test_random_shapes_and_ranges_stay_within_the_bound_property(codec):
    # Heads from float32's subnormals to its largest values, zero channels and heads, each dtype.
    g = torch.Generator().manual_seed(99)
    for trial in range(150):
        shape = tuple(int(v) for v in torch.randint(1, 7, (4,), generator=g))
        dtype = (torch.float32, torch.bfloat16, torch.float16, torch.float64)[trial % 4]
        low, high = (-24, 4) if dtype == torch.float16 else (-45, 38)
        exponents = torch.rand(shape[:2], generator=g, dtype=torch.float64) * (high - low) + low
        x = torch.randn(shape, generator=g, dtype=torch.float64) * (10.0 ** exponents)[:, :, None, None]
        x[..., int(torch.randint(shape[3], (1,), generator=g))] = 0
        if trial % 5 == 0:
            x[0, 0] = 0
        x = x.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
        q, scale = quantize(x, codec)
        assert torch.isfinite(scale).all() and (scale > 0).all() and scale.shape == shape[:2]
        xf = x.float()
        decoded = dequantize(q, scale, torch.float32)
        assert ((decoded - xf).abs() <= bound(codec, xf, scale)).all(), (trial, dtype, shape)
        back = dequantize(q, scale, dtype)
        assert back.dtype == dtype and back.device == x.device and torch.isfinite(back).all()
