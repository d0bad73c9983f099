"""Fingerprints: short strings that identify a base model, and a compressor on top of it.

Cached K/V are only meaningful for the exact weights that produced them and the exact decoder
that reads them. Everything that stores or consumes compressed data carries a fingerprint and
refuses data whose fingerprint differs (see ``errors.FingerprintMismatchError``).

Format: ``"<model id>@<base hash>"`` for a base model and
``"<model id>@<base hash>/sac-<compressor hash>"`` for a compressor.

Precision: a base model is identified by a sample of its weights rounded to bfloat16, so the same
published model loaded in float32 or bfloat16 keeps one fingerprint. Loaded in float16 it usually
gets another: float16 holds numbers below 2**-14 with fewer bits (and none above 65504), so the
smallest weights round otherwise (the packaged SmolLM2's, dequantized from a 4-bit GGUF, all fit).
No one rounding of the sample serves all three: float32 weights rounded to float16 and then to
bfloat16 differ from the same weights rounded to bfloat16 at once. So a compressor's checkpoint also
records the fingerprint its base model gets in float16 (``base_fingerprint_float16``, where it
differs), and a float16 model with that one is known as the checkpoint's base model. A checkpoint
saved before this was recorded, refused on a float16 model, says to load the model in bfloat16 or
float32.

A compressor's own trained tensors are hashed exactly: rounding them (e.g. exporting a float32
checkpoint in bfloat16, or loading it on a float16 model) changes the K/V they produce and some
greedy answers, so it makes a new compressor, and caches of the float32 weights are refused by the
rounded one. Tensors that a dtype holds exactly (a bfloat16 export's, in float32, or in float16
where its values lie in float16's normal range) keep the compressor's fingerprint, caches and stores.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import torch

from .errors import InvalidInputError

# Config keys that do not change what the model computes.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict",
    "_commit_hash", "architectures", "quantization_config", "_experts_implementation",
}
_WEIGHT_SAMPLE = 8192  # elements hashed from the start of each parameter


def hash_tensors(named: Iterable[tuple[str, torch.Tensor]], sample: int | None = None, exact: bool = False,
                 via: torch.dtype | None = None) -> str:
    """SHA-256 over names and values, optionally over the first ``sample`` elements only. Values
    are rounded to bfloat16 (the hash does not depend on the dtype the weights were loaded in), or
    with ``exact`` hashed as float32, which holds bfloat16/float16/float32 values exactly: equal
    values hash equally whatever dtype holds them, and rounded values hash differently. ``via``:
    the values as that dtype holds them first (float16: as the model loaded in float16 has them)."""
    return _hash_samples(((name, tensor.shape, tensor.detach().reshape(-1)[:sample]) for name, tensor in named),
                         exact, via)


def _hash_samples(samples: Iterable[tuple[str, torch.Size, torch.Tensor]], exact: bool = False,
                  via: torch.dtype | None = None) -> str:
    """``hash_tensors`` over (name, the tensor's shape, its flattened sample)."""
    h = hashlib.sha256()
    for name, shape, flat in samples:
        if via is not None:
            flat = flat.to(via)
        h.update(name.encode())
        h.update(str(tuple(shape)).encode())
        if exact:
            h.update(flat.to(torch.float32).cpu().numpy().tobytes())
        else:
            h.update(flat.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _stable_config(config):
    """``config`` (a config's ``to_dict()``) without the keys that do not change what the model
    computes, at every depth: a model of several parts (Gemma 3's text and vision configs) records
    the dtype it was loaded in inside each part's config too."""
    if isinstance(config, dict):
        return {k: _stable_config(v) for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(config, list):
        return [_stable_config(v) for v in config]
    return config


def base_model_fingerprint(model, tokenizer) -> str:
    """Fingerprint of a base model: config (incl. RoPE settings), tokenizer and a weight sample."""
    return _fingerprints(model, tokenizer, [None])[0]


def base_model_fingerprints(model, tokenizer) -> tuple[str, str]:
    """The base model's fingerprint, and the one the same model gets loaded in float16 (a compressor's
    checkpoint records both, so that a float16 copy of its base model is known as that model)."""
    plain, in_float16 = _fingerprints(model, tokenizer, [None, torch.float16])
    return plain, in_float16


def _fingerprints(model, tokenizer, vias: list[torch.dtype | None]) -> list[str]:
    """One fingerprint per ``via`` of ``hash_tensors`` (config and vocabulary read once)."""
    config = _stable_config(model.config.to_dict())
    vocab = sorted(tokenizer.get_vocab().items())
    model_id = getattr(model, "sac_model_id", None) or getattr(model.config, "_name_or_path", "") or "model"
    samples = [(n, p.shape, _readable(model, n, p).detach().reshape(-1)[:_WEIGHT_SAMPLE].clone())  # each read once
               for n, p in model.named_parameters() if "lora_" not in n and "anchor" not in n]
    fingerprints = []
    for via in vias:
        weights = _hash_samples(samples, via=via)
        fingerprints.append(f"{model_id}@{hash_json({'config': config, 'vocab': vocab, 'weights': weights})[:16]}")
    return fingerprints


def _readable(model, name: str, parameter: torch.Tensor) -> torch.Tensor:
    """``parameter``, or where its values are when accelerate offloads it (device_map="auto" with too
    little GPU memory): the module holds it on 'meta', the hook of that module or of a module around
    it (a decoder layer's) in a weights map, by the name below that module."""
    if not parameter.is_meta:
        return parameter
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):  # the parameter's own module first, then those around it
        hook = getattr(model.get_submodule(".".join(parts[:cut])), "_hf_hook", None)
        below = ".".join(parts[cut:])
        for part in (hook, *getattr(hook, "hooks", ())):  # a SequentialHook holds several
            weights = getattr(part, "weights_map", None)
            if weights is not None and below in weights:
                return weights[below]
    raise InvalidInputError(f"the model's {name} is on 'meta' with no values to read (not offloaded by accelerate, "
                            "which keeps them in its hook): load the model with its weights")


def base_part(fingerprint: str) -> str:
    """The base-model part of a compressor fingerprint."""
    return fingerprint.split("/sac-", 1)[0]


def compressor_tag(fingerprint: str) -> str:
    """The first 8 hex digits of a compressor fingerprint's own hash ("" for a base model): short
    enough for file names, long enough to tell the compressors of one base model apart."""
    return fingerprint.partition("/sac-")[2][:8]


def _identity(fingerprint: str) -> tuple[str, str]:
    base, _, compressor = fingerprint.partition("/sac-")
    return base.rsplit("@", 1)[-1], compressor


def same_model(a: str, b: str) -> bool:
    """True when two fingerprints name the same weights (the model id part may differ, e.g. a
    hub id vs a local copy of it)."""
    return _identity(a) == _identity(b)


def same_base_model(a: str, b: str) -> bool:
    return _identity(a)[0] == _identity(b)[0]


BASE_FINGERPRINT_FLOAT16 = "base_fingerprint_float16"  # a checkpoint's record of its base model in float16
FLOAT16_HINT = ("If it is the same model, loaded in float16: float16 cannot hold its smallest weights exactly, "
                "which gives another fingerprint; load it in bfloat16 or float32 (dtype=...), or save the "
                "checkpoint again with this sac_rag (it then records the float16 fingerprint too)")


def base_record(fingerprint: str, in_float16: str) -> dict[str, str]:
    """What a checkpoint records of its base model: its fingerprint, and the one it gets in float16
    (``base_model_fingerprints``) where that differs."""
    return {"base_fingerprint": fingerprint, **({BASE_FINGERPRINT_FLOAT16: in_float16} if in_float16 != fingerprint
                                                else {})}


def known_base(fingerprint: str, record: dict, dtype: torch.dtype | None) -> str | None:
    """How a model with ``fingerprint``, in ``dtype``, is known to a checkpoint's ``record``
    (``base_record``): as itself when it is the base model the checkpoint was made for; in float16,
    as the recorded base model (under the model's own id) when its fingerprint is the one that model
    gets in float16; None when it is another model."""
    recorded = record["base_fingerprint"]
    if same_base_model(fingerprint, recorded):
        return fingerprint
    if dtype == torch.float16 and same_base_model(fingerprint, record.get(BASE_FINGERPRINT_FLOAT16) or "@"):
        return f"{fingerprint.rsplit('@', 1)[0]}@{recorded.rsplit('@', 1)[-1]}"
    return None
