"""The compressed form of one chunk: the per-layer K/V of its anchor tokens.

An ``AnchorKV`` is what the compressor produces, what a store keeps, and what the generator
splices into the decoder's cache. Its keys carry RoPE at ``positions`` (= ``offset`` + local
anchor index); ``at_offset`` moves the chunk elsewhere exactly (see ``rope``; with multi-head
latent attention the rotated part is what the cache keeps as values).
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass, replace

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .devices import dtype_name, resolve_dtype
from .errors import InvalidInputError
from .rope import KeyRotator

FORMAT = "sac-anchor-kv/1"


@dataclass(frozen=True)
class AnchorKV:
    """Anchor K/V of one chunk.

    keys, values: ``[layers, kv_heads, n_anchors, head_dim]``.
    positions: ``[n_anchors]`` int64, the absolute positions the keys are rotated to.
    n_tokens: how many tokens the chunk had (the decoder's positions advance by this much).
    offset: absolute position of the chunk's first token.
    fingerprint: the compressor that produced it (``fingerprint`` module).
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    n_tokens: int
    offset: int
    fingerprint: str

    def __post_init__(self):
        if self.keys.dim() != 4 or self.keys.shape[:3] != self.values.shape[:3]:
            raise InvalidInputError(
                f"keys/values must be [layers, kv_heads, anchors, head_dim] with matching shapes; "
                f"got {tuple(self.keys.shape)} and {tuple(self.values.shape)}"
            )
        if self.positions.shape != (self.keys.shape[2],):
            raise InvalidInputError(
                f"{self.keys.shape[2]} anchors but {tuple(self.positions.shape)} positions"
            )
        # Plain ints: ``to_bytes`` writes them as text, which must read back (a float or a tensor
        # wrote '3.0' or 'tensor(3)', a blob that from_bytes and a store's read then refused).
        for name in ("n_tokens", "offset"):
            value = getattr(self, name)
            try:
                if isinstance(value, bool):
                    raise TypeError
                object.__setattr__(self, name, operator.index(value))
            except TypeError:
                raise InvalidInputError(f"{name} must be an integer, got {value!r}") from None

    @property
    def n_anchors(self) -> int:
        return self.keys.shape[2]

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None) -> AnchorKV:
        """Keys and values on ``device`` in ``dtype`` (a floating-point dtype or its name, "float16" or
        "bf16" as everywhere; None keeps each as it is); positions stay int64."""
        if isinstance(dtype, str) and dtype != "auto":  # "auto" would depend on the machine: refused below
            dtype = resolve_dtype(dtype, torch.device("cpu"))
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise InvalidInputError(f"K/V are kept in a floating-point dtype, not {dtype!r}")
        return replace(
            self,
            keys=self.keys.to(device=device, dtype=dtype),
            values=self.values.to(device=device, dtype=dtype),
            positions=self.positions.to(device=device),
        )

    def detach(self) -> AnchorKV:
        return replace(self, keys=self.keys.detach(), values=self.values.detach())

    def at_offset(self, offset: int, rotator: KeyRotator) -> AnchorKV:
        """The same chunk placed so that its first token sits at ``offset`` (an integer >= 0)."""
        try:
            if isinstance(offset, bool):
                raise TypeError
            offset = operator.index(offset)
        except TypeError:
            raise InvalidInputError(f"offset must be an integer position, got {offset!r}") from None
        if offset < 0:
            raise InvalidInputError(f"offset must be a position >= 0, got {offset}")
        delta = offset - self.offset
        if delta == 0:
            return self
        keys, values = rotator.move(self.keys, self.values, delta)
        return replace(
            self,
            keys=keys,
            values=values,
            positions=self.positions + delta,
            offset=offset,
        )

    # -- serialization: safetensors only (no pickle: a received file cannot run code) --------

    def to_bytes(self) -> bytes:
        keys = self.keys.detach().contiguous().cpu()
        values = self.values.detach().contiguous().cpu()
        if values.untyped_storage().data_ptr() == keys.untyped_storage().data_ptr():
            values = values.clone()  # safetensors refuses tensors that share memory (the bytes are the same)
        tensors = {
            "keys": keys,
            "values": values,
            "positions": self.positions.detach().to(torch.int64).contiguous().cpu(),
        }
        meta = {
            "format": FORMAT,
            "n_tokens": str(self.n_tokens),
            "offset": str(self.offset),
            "fingerprint": self.fingerprint,
            "dtype": dtype_name(self.keys.dtype),
        }
        return st_save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> AnchorKV:
        """The ``AnchorKV`` of ``to_bytes``. Bytes that are not one (truncated, damaged, another
        safetensors file, another format) raise ``InvalidInputError`` saying why."""
        data = _as_bytes(data)
        meta = read_metadata(data)
        if meta.get("format") != FORMAT:
            raise InvalidInputError(f"not an AnchorKV blob (format {meta.get('format')!r}, expected {FORMAT!r})")
        try:
            tensors = st_load(data)
        except Exception as err:  # safetensors' own error type: a truncated or damaged blob
            raise InvalidInputError(f"corrupt or truncated AnchorKV blob ({len(data)} bytes): {err}") from None
        missing = [name for name in ("keys", "values", "positions") if name not in tensors]
        missing += [name for name in ("n_tokens", "offset", "fingerprint") if name not in meta]
        if missing:
            raise InvalidInputError(f"AnchorKV blob without {', '.join(missing)}")
        try:
            n_tokens, offset = int(meta["n_tokens"]), int(meta["offset"])
        except ValueError:
            raise InvalidInputError(f"AnchorKV blob with n_tokens {meta['n_tokens']!r} and offset "
                                    f"{meta['offset']!r}; both must be integers") from None
        for name in ("keys", "values"):  # a damaged header ("F32" -> "I32") still loads
            if not tensors[name].dtype.is_floating_point:
                raise InvalidInputError(f"AnchorKV blob with {dtype_name(tensors[name].dtype)} {name}; "
                                        "K/V are floating-point")
        recorded = meta.get("dtype", dtype_name(tensors["keys"].dtype))
        if recorded != dtype_name(tensors["keys"].dtype):
            raise InvalidInputError(f"AnchorKV blob with {dtype_name(tensors['keys'].dtype)} keys, but its "
                                    f"metadata records {recorded!r}")
        positions = tensors["positions"]
        if positions.dtype != torch.int64:
            raise InvalidInputError(f"AnchorKV blob with {dtype_name(positions.dtype)} positions, not int64")
        return cls(
            keys=tensors["keys"],
            values=tensors["values"],
            positions=positions,
            n_tokens=n_tokens,
            offset=offset,
            fingerprint=meta["fingerprint"],
        )


def _as_bytes(data) -> bytes:
    """``data`` (bytes, bytearray or memoryview) as bytes; anything else is refused."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise InvalidInputError(f"expected the bytes of a safetensors blob, got {type(data).__name__}")


def read_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors blob, read from its JSON header alone (cheap, and
    no tensor is decoded): how the store tells an entry's format before decoding it."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInputError(f"expected the bytes of a safetensors blob, got {type(data).__name__}")
    if len(data) < 8:
        raise InvalidInputError("blob too short to be safetensors")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise InvalidInputError("corrupt safetensors header length")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
    except ValueError as err:
        raise InvalidInputError("corrupt safetensors header") from err
    if not isinstance(header, dict):
        raise InvalidInputError("corrupt safetensors header (not a JSON object)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict):
        raise InvalidInputError("corrupt safetensors header (its __metadata__ is not a JSON object)")
    return meta
