"""The compressed form of one chunk: the per-layer K/V of its anchor tokens.

An ``AnchorKV`` is what the compressor produces, what a store keeps, and what the generator
splices into the decoder's cache. Its keys carry RoPE at ``positions`` (= ``offset`` + local
anchor index); ``at_offset`` moves the chunk elsewhere exactly (see ``rope``; with multi-head
latent attention the rotated part is what the cache keeps as values).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .devices import dtype_name
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

    @property
    def n_anchors(self) -> int:
        return self.keys.shape[2]

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AnchorKV:
        return replace(
            self,
            keys=self.keys.to(device=device, dtype=dtype),
            values=self.values.to(device=device, dtype=dtype),
            positions=self.positions.to(device=device),
        )

    def detach(self) -> AnchorKV:
        return replace(self, keys=self.keys.detach(), values=self.values.detach())

    def at_offset(self, offset: int, rotator: KeyRotator) -> AnchorKV:
        """The same chunk placed so that its first token sits at ``offset``."""
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
        tensors = {
            "keys": self.keys.detach().contiguous().cpu(),
            "values": self.values.detach().contiguous().cpu(),
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
        meta = read_metadata(data)
        if meta.get("format") != FORMAT:
            raise InvalidInputError(f"not an AnchorKV blob (format {meta.get('format')!r}, expected {FORMAT!r})")
        tensors = st_load(data)
        return cls(
            keys=tensors["keys"],
            values=tensors["values"],
            positions=tensors["positions"],
            n_tokens=int(meta["n_tokens"]),
            offset=int(meta["offset"]),
            fingerprint=meta["fingerprint"],
        )


def read_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors blob, read from its JSON header alone (cheap, and
    no tensor is decoded): how the store tells an entry's format before decoding it."""
    if len(data) < 8:
        raise InvalidInputError("blob too short to be safetensors")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise InvalidInputError("corrupt safetensors header length")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except ValueError as err:
        raise InvalidInputError("corrupt safetensors header") from err
    return header.get("__metadata__", {})
