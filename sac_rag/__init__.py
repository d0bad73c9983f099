"""sac_rag: Semantic-Anchor Compression for retrieval-augmented generation.

Retrieved text becomes the K/V of a few of its own tokens ("anchors"), r times smaller than
the text's full cache; the frozen LLM answers from those caches (arXiv 2510.08907).
"""

from .anchors import (
    AnchorSelector,
    ImportanceAnchors,
    RandomAnchors,
    RarestInBlockAnchors,
    UniformAnchors,
    anchor_count,
)
from .compressor import SACCompressor, list_pretrained
from .config import PromptTemplate, SACConfig
from .errors import (
    CheckpointError,
    FingerprintMismatchError,
    InvalidInputError,
    ModelNotAvailableError,
    PromptError,
    PromptTooLongError,
    SACError,
    UnsupportedModelError,
)
from .generation import Generation, GenerationConfig, Generator
from .kv import AnchorKV
from .models import BUILTIN_MODELS, load_base_model
from .pipeline import DEFAULT_COMPRESSOR, SAC

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_COMPRESSOR",
    "SAC",
    "AnchorKV",
    "AnchorSelector",
    "CheckpointError",
    "FingerprintMismatchError",
    "Generation",
    "GenerationConfig",
    "Generator",
    "ImportanceAnchors",
    "InvalidInputError",
    "ModelNotAvailableError",
    "PromptError",
    "PromptTooLongError",
    "PromptTemplate",
    "RandomAnchors",
    "RarestInBlockAnchors",
    "SACCompressor",
    "SACConfig",
    "SACError",
    "UniformAnchors",
    "UnsupportedModelError",
    "anchor_count",
    "list_pretrained",
    "load_base_model",
]
