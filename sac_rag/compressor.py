"""The SAC encoder: the base LM + LoRA, bidirectional attention and a learned anchor embedding,
turning each chunk of text into the per-layer K/V of a few of its own tokens (METHOD.md).

One model lives in memory: the encoder runs with the adapter on, the frozen decoder
(``SACCompressor.decoder_mode``) with it off. ``merged_decoder`` makes a second copy for
decoding only, with the decoder adapter merged into its weights, when speed matters more than memory.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import operator
import os
import shutil
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .anchors import AnchorSelector, anchor_count, make_selector
from .config import SACConfig, text_ids
from .devices import input_device, resolve_device, resolve_dtype
from .errors import CheckpointError, CheckpointWriteError, FingerprintMismatchError, InvalidInputError
from .files import atomic_write, fsync_dir
from .fingerprint import (
    BASE_FINGERPRINT_FLOAT16,
    FLOAT16_HINT,
    base_model_fingerprint,
    base_model_fingerprints,
    base_record,
    hash_json,
    hash_tensors,
    known_base,
    same_base_model,
)
from .generation import check_recommended_decoding
from .kv import AnchorKV
from .models import BUILTIN_MODELS, cache_dir, load_base_model
from .refine import refine
from .rope import KeyRotator

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "compressor.safetensors"
# New weights wait here until config.json names them (save_pretrained); a kill can leave them.
PENDING_WEIGHTS_FILE = ".compressor.safetensors.pending"
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
DEFAULT_COMPRESSOR = "smollm2-135m-sac-5x"  # the packaged default, loaded when no name is given
WEIGHTS_FROM = "weights_from"  # config.json's key: the sibling directory holding the weights (save_pretrained)
RECOMMENDED_DECODING = "recommended_decoding"  # config.json's key (SACCompressor.recommended_decoding)


def _naming_model(config: SACConfig, model) -> SACConfig:
    """``config`` naming the passed ``model`` where it names no base model of its own (it keeps
    SACConfig's default): ``base_model`` becomes the name the model was loaded by
    (``load_base_model``'s ``sac_model_id``, else transformers' ``name_or_path``), so that a
    checkpoint saved from it loads that model, not the default. Unchanged for a config that names
    a model (a directory the model was saved to, say) and for a model without a name."""
    name = getattr(model, "sac_model_id", None) or getattr(model, "name_or_path", None)
    if not isinstance(name, str) or not name or config.base_model != SACConfig().base_model:
        return config
    return replace(config, base_model=name)


def _check_placement(model, device, dtype) -> None:
    """``device``/``dtype`` choose where a base model that sac_rag loads itself goes; a model passed
    in is used where and as it is. Rather than ignore a choice the passed model does not match (a
    compressor left on the CPU that was asked for on a GPU, or in float32 when asked for bfloat16),
    refuse it: the caller moves or casts the model, or leaves the choice out."""
    where, kind = input_device(model), model.get_input_embeddings().weight.dtype
    if device is not None and device != "auto":
        wanted = resolve_device(device)
        index_chosen = torch.device(device).index is not None  # "cuda" takes the model on any GPU
        if wanted.type != where.type or (index_chosen and wanted.index != where.index):
            raise InvalidInputError(f"device={device!r}, but the model passed is on {where}: move it first "
                                    f"(model.to({str(wanted)!r})) or leave device out")
    wanted_dtype = None if dtype is None or dtype == "auto" else resolve_dtype(dtype, where)
    if wanted_dtype is not None and wanted_dtype != kind:
        raise InvalidInputError(f"dtype={dtype!r}, but the model passed is in {kind}: cast it first "
                                f"(model.to({wanted_dtype})) or leave dtype out")


def _check_no_adapters(model) -> None:
    """Refuse a model that already carries LoRA layers: another compressor's, which adds its adapters
    to the model passed to it, in place. This compressor's adapters would replace that one's, which
    would go on making other K/V under its own fingerprint (and one without adapters would read
    through them)."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")  # a model with LoRA layers has imported it
    if tuners is not None and any(isinstance(m, tuners.BaseTunerLayer) for m in model.modules()):
        raise InvalidInputError("the model passed already carries LoRA layers (another compressor's: a compressor "
                                "adds its adapters to its base model in place), which this one's would replace: "
                                "pass a fresh copy of the base model (load_base_model(name) again)")


def _check_adapters_have_a_device(model, config: SACConfig) -> None:
    """Refuse to add LoRA adapters to a model whose weights accelerate offloads (on 'meta' in the
    module, their values in its hook): peft would create the adapters there too, with no values."""
    if (config.lora_rank or config.decoder_lora_rank) and any(p.is_meta for p in model.parameters()):
        raise InvalidInputError("the model passed has weights offloaded by accelerate (on 'meta'; device_map with "
                                "'cpu' or 'disk' entries, or cpu_offload), where a compressor's LoRA adapters would "
                                "be created without values: load the model fully onto its devices (more GPUs, or a "
                                "smaller dtype). A compressor without adapters (lora_rank=0, decoder_lora_rank=0, "
                                "such as KV dropping) reads offloaded models")


def _base_fingerprint_for(fingerprint: str, meta: dict, directory: Path, advice: str,
                          dtype: torch.dtype | None = None) -> str:
    """The base-model fingerprint a compressor loaded from the checkpoint ``meta`` keeps
    (``fingerprint.known_base``: a float16 copy of the base model too); another model is refused,
    naming both."""
    known = known_base(fingerprint, meta, dtype)
    if known is None:
        hint = f". {FLOAT16_HINT}" if dtype == torch.float16 else ""
        name = fingerprint.partition("@")[0]
        if name == meta["base_fingerprint"].partition("@")[0]:  # the model it names, with other weights
            advice = (f"the model loaded as {name!r} is not the one the compressor was trained on: its weights or "
                      "tokenizer changed" + (f" (a built-in model is converted from its package into "
                                             f"{cache_dir() / 'models'} by the installed transformers and gguf; "
                                             "other versions of them or of the package may convert it to other "
                                             "weights, so install the versions the compressor was trained with)"
                                             if name in BUILTIN_MODELS else "") +
                      "; or train a compressor for this model")
        raise FingerprintMismatchError(f"compressor checkpoint {directory}", fingerprint, meta["base_fingerprint"],
                                       advice + hint)
    return known


def _without_base_model(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "base_model"}


class SACCompressor(torch.nn.Module):
    """Compresses text into ``AnchorKV`` chunks.

    >>> compressor = SACCompressor.from_pretrained("smollm2-135m-sac-5x")   # doctest: +SKIP
    >>> chunks = compressor.compress("Some retrieved passage ...")          # doctest: +SKIP

    ``recommended_decoding``: the decoding its scores were measured with (say ``{"num_beams": 8,
    "mbr": True}``; empty: the library's greedy default), saved in its ``config.json``. ``SAC``,
    ``SACEngine`` and the framework wrappers decode answers from its caches with it where the caller
    leaves a setting unset (``GenerationConfig.with_recommended``); prompts without compressed
    contexts decode greedily. It is not part of the fingerprint: it changes answers, not caches.
    """

    def __init__(
        self,
        config: SACConfig | None = None,
        model=None,
        tokenizer=None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        anchor_selector: AnchorSelector | None = None,
    ):
        super().__init__()
        # Its own copy: retarget_ratio / use_anchors change it, which must not reach another
        # compressor built from the same SACConfig (its fingerprint would not follow).
        self.config = config = copy.deepcopy(config) if config is not None else SACConfig()
        if model is None and tokenizer is not None:  # it would be dropped for the base model's own
            raise InvalidInputError("pass the model together with the tokenizer (or neither: both are then "
                                    "loaded from the config's base_model)")
        if model is None:
            model, tokenizer = load_base_model(config.base_model, device=device, dtype=dtype)
        elif tokenizer is None:
            raise InvalidInputError("pass the tokenizer together with the model")
        else:  # the checkpoint must name the model passed, not the config's default
            _check_placement(model, device, dtype)
            _check_no_adapters(model)
            _check_adapters_have_a_device(model, config)
            self.config = config = _naming_model(config, model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.base_fingerprint, self._base_fingerprint_float16 = base_model_fingerprints(model, tokenizer)
        self.rotator = KeyRotator.from_model(model)
        self._base = model
        self._base_modules = frozenset(map(id, model.modules()))  # before peft adds its own: see train()
        self.model = self._with_adapter(model, config)
        self.selector = anchor_selector or make_selector(config.anchor_strategy, seed=config.anchor_seed)
        hidden = model.config.get_text_config(decoder=True).hidden_size
        rows = {"shared": 1, "per_slot": anchor_count(config.chunk_len, config.ratio), "none": 0}
        embed_weight = model.get_input_embeddings().weight
        self.anchor_embedding = torch.nn.Parameter(  # where the embeddings compute (not 'meta' if offloaded)
            torch.randn(rows[config.anchor_embedding], hidden, device=input_device(model))
            .mul_(0.02).to(embed_weight.dtype)
        )
        max_positions = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
        if max_positions and config.chunk_len > max_positions:
            raise InvalidInputError(
                f"chunk_len={config.chunk_len} exceeds the model's {max_positions} positions"
            )
        self._fingerprint_cache: tuple[tuple, str] | None = None
        self._recommended_decoding: dict = {}
        self._lora_parameters: list[torch.nn.Parameter] | None = None
        self._switches: tuple[list[dict] | None] | None = None  # (what _adapter_switches found,) once looked for
        self.train(False)  # peft makes its layers in training mode: dropout would reach answers

    def train(self, mode: bool = True) -> SACCompressor:
        """Training mode (dropout on) for what trains, the adapters, never for the base model they
        wrap, which is the frozen decoder too: its own dropout stays off. A compressor is built in
        eval mode, so it compresses and answers deterministically until a training loop calls
        ``train()``; ``eval()`` ends that."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        for module in self.modules():
            if id(module) not in self._base_modules:  # this module, and what peft added to the base model
                module.training = mode
        return self

    @staticmethod
    def _with_adapter(model, config: SACConfig):
        if config.lora_rank == 0:
            return model
        from peft import get_peft_model

        with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question: not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, _lora_config(config.lora_rank, config.lora_alpha, config))
        if config.decoder_lora_rank:
            alpha = config.decoder_lora_alpha or 2 * config.decoder_lora_rank
            peft_model.add_adapter("decoder", _lora_config(config.decoder_lora_rank, alpha, config))
            peft_model.set_adapter("default")
        return peft_model

    def add_decoder_adapter(self, rank: int, alpha: int = 0) -> None:
        """Add a (fresh) decoder-side adapter to a compressor trained without one."""
        if self.config.decoder_lora_rank:
            raise InvalidInputError("this compressor already has a decoder adapter")
        if not self.config.lora_rank:
            raise InvalidInputError("a decoder adapter needs an encoder adapter too (lora_rank > 0)")
        self.config.decoder_lora_rank, self.config.decoder_lora_alpha = rank, alpha
        self.config.validate()
        self.model.add_adapter("decoder", _lora_config(rank, alpha or 2 * rank, self.config))
        self.model.set_adapter("default")
        self.train(self.training)  # peft makes the new layers in training mode
        self._fingerprint_cache = self._lora_parameters = self._switches = None

    def set_adapter_weights(self, state: dict[str, torch.Tensor], adapter: str = "default") -> None:
        """Load a peft LoRA state dict (e.g. a Full-FT adapter's ``adapter_model.safetensors``) into
        the encoder adapter (``"default"``) or the decoder adapter (``"decoder"``); every LoRA
        tensor of that adapter must be given, and nothing else."""
        from peft import set_peft_model_state_dict

        rank = {"default": self.config.lora_rank, "decoder": self.config.decoder_lora_rank}.get(adapter, 0)
        if not rank:
            raise InvalidInputError(f"this compressor has no {adapter!r} adapter")
        result = set_peft_model_state_dict(self.model, dict(state), adapter_name=adapter)
        missing = [k for k in result.missing_keys if "lora_" in k and f".{adapter}." in k]
        if result.unexpected_keys or missing:
            raise InvalidInputError(f"these weights do not fit the {adapter!r} adapter's LoRA layers: "
                                    f"unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}")
        self._fingerprint_cache = None

    def widened(self, lora_rank: int = 0, decoder_lora_rank: int = 0, model=None, tokenizer=None) -> SACCompressor:
        """A new compressor that computes exactly what this one does, with its encoder (and/or
        decoder) LoRA enlarged to the given rank (0 = keep): a warm start for training with more
        adapter capacity. The old components fill the first rows of A and columns of B; the added
        columns of B are zero, so the added components have no effect until trained. alpha grows
        with the rank, so alpha / rank (the update's scale) stays the same. The new adapters live on
        a fresh copy of the base model: ``model``/``tokenizer`` if given (it must be the same base
        model), else loaded by the config's name."""
        old = self.config
        new = SACConfig.from_dict(old.to_dict())
        if lora_rank:
            new.lora_alpha = _widened_alpha("encoder", old.lora_rank, lora_rank, old.lora_alpha)
            new.lora_rank = lora_rank
        if decoder_lora_rank:  # a decoder alpha of 0 means 2 x rank, which keeps the scale by itself
            new.decoder_lora_alpha = _widened_alpha("decoder", old.decoder_lora_rank, decoder_lora_rank,
                                                    old.decoder_lora_alpha)
            new.decoder_lora_rank = decoder_lora_rank
        wide = SACCompressor(new, model=model, tokenizer=tokenizer, device=self.device, dtype=self.dtype,
                             anchor_selector=self.selector)
        if not same_base_model(wide.base_fingerprint, self.base_fingerprint):
            raise FingerprintMismatchError("the base model given to widened()", self.base_fingerprint,
                                           wide.base_fingerprint, "pass a fresh copy of this compressor's base model")
        mine_all, state = self.trainable_tensors(), {}
        for key, fresh in wide.trainable_tensors().items():
            mine = mine_all[key].detach().to(fresh.dtype)
            grown = fresh.detach().clone()
            if ".lora_B." in key:
                grown.zero_()
            grown[tuple(slice(0, n) for n in mine.shape)] = mine
            state[key] = grown
        wide._load_tensors(state, Path(f"<{old.lora_rank}-rank compressor widened>"))
        return wide

    def retarget_ratio(self, ratio: int) -> None:
        """Compress at another ratio from now on, keeping the trained weights: a warm start for
        training a compressor at that ratio (the encoder and a shared anchor embedding do not
        depend on the ratio; a per-slot table does, and is refused)."""
        if self.config.anchor_embedding == "per_slot":  # compression tokens always have one
            raise InvalidInputError("a per-slot anchor table has one row per anchor of the old ratio: "
                                    "train a compressor with anchor_embedding='shared' to change ratios")
        self.config.ratio = ratio
        self.config.validate()
        self._fingerprint_cache = None

    def use_anchors(self, strategy: str) -> None:
        """Choose anchors by another saved strategy (``sac_rag.anchors``) from now on, keeping
        the trained weights: to measure what anchor placement alone does to trained weights, or
        as a warm start for training with it. The fingerprint changes with it."""
        self.selector = make_selector(strategy, seed=self.config.anchor_seed)
        self.config.anchor_strategy = strategy
        self._fingerprint_cache = None

    # -- properties -------------------------------------------------------------------------

    @property
    def recommended_decoding(self) -> dict:
        return dict(self._recommended_decoding)

    @recommended_decoding.setter
    def recommended_decoding(self, settings: dict) -> None:
        self._recommended_decoding = check_recommended_decoding(settings, "SACCompressor.recommended_decoding")

    @property
    def base_model(self):
        """The underlying causal LM (with LoRA layers injected, if any)."""
        return self._base

    @property
    def device(self) -> torch.device:
        return self.anchor_embedding.device

    @property
    def dtype(self) -> torch.dtype:
        return self._base.get_input_embeddings().weight.dtype

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the anchor embedding and the LoRA weights."""
        tensors = {"anchor_embedding": self.anchor_embedding}
        if self.config.lora_rank > 0:
            from peft import get_peft_model_state_dict

            for name, value in get_peft_model_state_dict(self.model, adapter_name="default").items():
                tensors[f"lora.{name}"] = value
        if self.config.decoder_lora_rank:
            for name, value in get_peft_model_state_dict(self.model, adapter_name="decoder").items():
                tensors[f"decoder_lora.{name}"] = value
        return tensors

    @property
    def fingerprint(self) -> str:
        """``base fingerprint/sac-<hash of settings and trained weights>`` (and of the anchor
        selector, when it is not the one the settings name). Recomputed only when the settings, the
        selector or a trainable tensor changed (torch's per-tensor version counter); the settings
        are compared by value, as ``config`` is a plain dataclass a caller may edit."""
        # The parameters themselves (not state-dict views) stay the same objects when moved.
        versions = (hash_json(self.config.to_dict()), self.selector.identity(),
                    *((t._version, t.data_ptr()) for t in [self.anchor_embedding, *self.lora_parameters()]))
        if self._fingerprint_cache is None or self._fingerprint_cache[0] != versions:
            self._fingerprint_cache = (versions, self._fingerprint_of(self.trainable_tensors()))
        return self._fingerprint_cache[1]

    def _fingerprint_of(self, tensors: dict[str, torch.Tensor]) -> str:
        """The fingerprint this compressor has with ``tensors`` as its trained weights (hashed
        exactly: see ``fingerprint``'s module docstring on precision)."""
        config = self.config.to_dict()
        config.pop("base_model")
        identity = {"config": config, "weights": hash_tensors(sorted(tensors.items()), exact=True)}
        anchors = self.selector.identity()
        if anchors != make_selector(self.config.anchor_strategy, seed=self.config.anchor_seed).identity():
            identity["anchors"] = anchors  # a selector passed in code: not the one the config names
        digest = hash_json(identity)[:16]
        return f"{self.base_fingerprint}/sac-{digest}"

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """Every LoRA parameter of the model (both adapters), found once."""
        if self._lora_parameters is None:
            self._lora_parameters = [p for n, p in self.model.named_parameters() if "lora_" in n]
        return self._lora_parameters

    def decoder_mode(self):
        """Context in which the shared model acts as the decoder that reads compressed contexts:
        the frozen LM (adapters off), or the LM with the decoder adapter if there is one."""
        if self.config.decoder_lora_rank:
            return self._adapter_state("decoder")
        return self.frozen_mode()

    def frozen_mode(self):
        """Context in which the shared model is exactly the base LM (every adapter off)."""
        if self.config.lora_rank == 0:
            return contextlib.nullcontext()
        return self._adapter_state(None)

    def merged_decoder(self):
        """A copy of the decoder that reads compressed contexts, without LoRA layers: the decoder
        adapter (if any) merged into its weights, the encoder adapter left out. A step through it
        skips the adapter's extra matrix products (``decoder_mode`` runs them on every layer), at
        the cost of one more copy of the weights that an adapter touches; the others (embeddings,
        norms) are shared. It is a snapshot: later changes to this compressor's weights do not
        reach it. Merging rounds once, so its logits equal ``decoder_mode``'s up to float rounding.
        A compressor without any adapter (``lora_rank=0``) returns its model itself: nothing to merge."""
        if self.config.lora_rank == 0:
            return self._base  # no adapter anywhere: the model is already the decoder
        from peft.tuners.tuners_utils import BaseTunerLayer

        adapted = {id(p) for m in self.model.modules() if isinstance(m, BaseTunerLayer) for p in m.parameters()}
        shared = {id(p): p for p in self.model.parameters() if id(p) not in adapted}
        copied = copy.deepcopy(self.model, memo=shared)  # the memo makes the copy reuse the shared tensors
        if self.config.decoder_lora_rank:
            decoder = copied.merge_and_unload(adapter_names=["decoder"])
        else:
            decoder = copied.unload()
        return decoder.eval().requires_grad_(False)

    @contextlib.contextmanager
    def _adapter_state(self, adapter: str | None):
        """Context in which the LoRA layers run ``adapter`` alone (``None``: none of them), put back
        as they were on exit. Cheap enough to enter for every decoding step (a stream does, so the
        model is free between its pieces): it sets each layer's active adapter and off switch, the
        two things its forward reads, where peft's ``set_adapter`` and ``disable_adapter`` also
        rewrite every adapter's ``requires_grad`` (which training has set itself) and walk the whole
        model (10 and 56 ms on SmolLM2-135M, against 0.1). With another peft, whose layers keep their
        state elsewhere, it takes peft's way and restores the flags."""
        states = self._adapter_switches()
        if states is None:
            with self._peft_adapter_state(adapter):
                yield
            return
        tuner = vars(self.model.base_model)
        before = [(state["_active_adapter"], state["_disable_adapters"]) for state in states]
        tuner_before = tuner["active_adapter"]
        try:
            for state in states:  # the instance dicts: nn.Module.__setattr__ costs 30 times more
                if adapter is not None:
                    state["_active_adapter"] = [adapter]
                state["_disable_adapters"] = adapter is None
            if adapter is not None:
                tuner["active_adapter"] = adapter
            yield
        finally:
            for state, (active, disabled) in zip(states, before):
                state["_active_adapter"], state["_disable_adapters"] = active, disabled
            tuner["active_adapter"] = tuner_before

    @contextlib.contextmanager
    def _peft_adapter_state(self, adapter: str | None):
        """``_adapter_state`` through peft's own switches, its ``requires_grad`` changes undone."""
        flags = [(p, p.requires_grad) for p in self.lora_parameters()]
        switch = self.model.disable_adapter() if adapter is None else contextlib.nullcontext()
        try:
            with switch:
                if adapter is not None:
                    self.model.set_adapter(adapter)
                yield
        finally:
            if adapter is not None:
                self.model.set_adapter("default")
            for p, flag in flags:
                p.requires_grad_(flag)

    def _adapter_switches(self) -> list[dict] | None:
        """The instance dicts of the model's LoRA layers, which ``_adapter_state`` writes (found once);
        ``None`` if this peft's layers or tuner do not keep their state there."""
        if self._switches is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            states = [vars(m) for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
            names = ("_active_adapter", "_disable_adapters")
            kept_here = all(name in state for state in states for name in names) \
                and "active_adapter" in vars(self.model.base_model)
            self._switches = (states if kept_here else None,)
        return self._switches[0]

    # -- text -> chunks -----------------------------------------------------------------------

    def split(self, text: str) -> list[list[int]]:
        """Token ids of ``text`` in sub-contexts of at most ``chunk_len`` tokens (never truncated)."""
        if not isinstance(text, str):
            raise InvalidInputError(f"text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise InvalidInputError("text is empty or whitespace only: there is nothing to compress")
        ids = text_ids(self.tokenizer, text)  # a special token's text in a document is not that token
        step = self.config.chunk_len
        return [ids[i : i + step] for i in range(0, len(ids), step)]

    def compress(self, text: str) -> list[AnchorKV]:
        """One ``AnchorKV`` per chunk of ``text``, chunk c at its global position."""
        return self.compress_batch([text])[0]

    def compress_batch(
        self, texts: Sequence[str], batch_size: int = 8, show_progress: bool = False
    ) -> list[list[AnchorKV]]:
        """Compress several texts; their chunks share forward passes of ``batch_size`` chunks."""
        if isinstance(texts, str):
            raise InvalidInputError("compress_batch takes a list of texts; use compress(text) for one")
        if isinstance(texts, (bytes, dict, set, frozenset)) or not isinstance(texts, Iterable):
            raise InvalidInputError(f"compress_batch takes a list of texts (in the order of its results), got "
                                    f"{type(texts).__name__}")
        texts = list(texts)  # read once: a generator would be empty when the results are grouped by text
        chunks: list[list[int]] = []
        offsets: list[int] = []
        owner: list[int] = []
        for i, text in enumerate(texts):
            position = 0
            for chunk in self.split(text):
                chunks.append(chunk)
                offsets.append(position)
                owner.append(i)
                position += len(chunk)
        flat = self.compress_chunks(chunks, offsets, batch_size=batch_size, show_progress=show_progress)
        grouped: list[list[AnchorKV]] = [[] for _ in texts]
        for i, kv in zip(owner, flat):
            grouped[i].append(kv)
        return grouped

    @torch.no_grad()
    def compress_chunks(
        self,
        chunks: Sequence[Sequence[int]],
        offsets: Sequence[int] | None = None,
        batch_size: int = 8,
        show_progress: bool = False,
    ) -> list[AnchorKV]:
        """Inference entry point over token chunks: sorted by length to minimise padding,
        compressed at most ``batch_size`` at a time (fewer where their lengths differ so much that
        padding would add more than ``MAX_PADDING`` to a batch's tokens), returned in the input
        order, detached."""
        if isinstance(chunks, (str, bytes)) or not isinstance(chunks, Iterable):
            raise InvalidInputError(f"compress_chunks takes a list of token-id lists, got {type(chunks).__name__}; "
                                    "for text use compress(text)")
        chunks = _checked_token_ids(chunks, self._base.get_input_embeddings().weight.shape[0])
        offsets = _chunk_offsets(len(chunks), offsets)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.config.validate()  # settings edited since (refine_steps, say) are checked before they are used
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i]))
        results: list[AnchorKV | None] = [None] * len(chunks)
        from tqdm.auto import tqdm

        with evaluating(self), tqdm(total=len(chunks), unit="chunk", disable=not show_progress,
                                    desc="compressing") as bar:
            for batch in _padding_bounded(order, [len(c) for c in chunks], batch_size):
                encoded = self.encode([chunks[i] for i in batch], [offsets[i] for i in batch])
                if self.config.refine_steps:
                    encoded = refine(self, encoded, [chunks[i] for i in batch], self.config.refine_steps,
                                     self.config.refine_lr)
                for i, kv in zip(batch, encoded):
                    results[i] = kv
                bar.update(len(batch))
        return results  # type: ignore[return-value]

    # -- the encoder forward pass ------------------------------------------------------------

    def anchor_indices(self, chunk: Sequence[int]) -> list[int]:
        return self.selector.select(chunk, self.config.ratio)

    def encode(
        self, chunks: Sequence[Sequence[int]], offsets: Sequence[int], future_bias: float = 0.0
    ) -> list[AnchorKV]:
        """One batched encoder pass (differentiable; ``compress_chunks`` wraps it for inference).

        Chunks are right-padded; padding is masked as a key, and each chunk's tokens take
        positions ``offset .. offset + n - 1`` so anchor keys carry RoPE at those positions.
        With ``memory="compression_tokens"`` each chunk is followed by its memory tokens, placed
        at the positions its anchors would have, and their K/V is kept instead.

        ``future_bias`` > 0 (training only) subtracts that much from the attention scores of later
        tokens in a bidirectional encoder: a large value is nearly causal, 0 is fully
        bidirectional, so training can anneal from the pretrained causal K/V to SAC's encoder.
        """
        if not chunks:
            return []
        for chunk in chunks:
            if not 1 <= len(chunk) <= self.config.chunk_len:
                raise InvalidInputError(
                    f"a chunk must have 1..{self.config.chunk_len} tokens, got {len(chunk)}; "
                    f"use split() or compress() for longer text"
                )
        from transformers import DynamicCache

        device = self.device
        appended = self.config.memory == "compression_tokens"
        anchors = [self.anchor_indices(chunk) for chunk in chunks]
        kept = [list(range(len(c), len(c) + len(a))) if appended else a for c, a in zip(chunks, anchors)]
        lengths = [len(c) + (len(a) if appended else 0) for c, a in zip(chunks, anchors)]
        width = max(lengths)
        ids = torch.full((len(chunks), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunks), width), dtype=torch.long)
        positions = torch.zeros((len(chunks), width), dtype=torch.long)
        for row, (chunk, idx, offset) in enumerate(zip(chunks, anchors, offsets)):
            ids[row, : len(chunk)] = torch.as_tensor(list(chunk), dtype=torch.long)
            mask[row, : lengths[row]] = 1
            positions[row, : len(chunk)] = torch.arange(offset, offset + len(chunk))
            if appended:  # memory tokens sit where the anchors would (EPL's uniform position ids)
                positions[row, len(chunk) : lengths[row]] = torch.as_tensor(idx) + offset
        # dynamic RoPE: only where its frequencies hold (memory tokens sit at anchors', inside their chunk)
        self.rotator.check_positions(max(offset + len(chunk) for chunk, offset in zip(chunks, offsets)))
        host_positions = positions
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)

        embeds = self._base.get_input_embeddings()(ids)
        if self.config.anchor_embedding != "none":
            embeds = embeds + self._anchor_additions(kept, width).to(embeds.dtype)
        attention = mask
        if self.config.bidirectional and future_bias > 0:
            attention = _biased_bidirectional_mask(mask, future_bias, embeds.dtype)
        out = self._base.get_decoder()(
            inputs_embeds=embeds,
            attention_mask=attention,
            position_ids=positions,
            # every token's K/V in every layer: a cache made from the model's config would keep a
            # sliding-window layer's last window only, and the anchor indices would miss
            cache=DynamicCache(),
            use_cache=True,
            is_causal=not self.config.bidirectional,
        )
        layers = out.cache.layers
        fingerprint = self.fingerprint
        results = []
        for row, (chunk, idx) in enumerate(zip(chunks, kept)):
            index = torch.as_tensor(idx, dtype=torch.long)
            # Each layer's K/V are gathered on that layer's device (a model sharded with device_map
            # has its layers on several GPUs) and the chunk is kept on the input device.
            on_device = {d: index.to(d) for d in {t.device for layer in layers for t in (layer.keys, layer.values)}}
            keys = torch.stack([layer.keys[row].index_select(1, on_device[layer.keys.device]).to(device)
                                for layer in layers])
            values = torch.stack([layer.values[row].index_select(1, on_device[layer.values.device]).to(device)
                                  for layer in layers])
            results.append(
                AnchorKV(
                    keys=keys,
                    values=values,
                    positions=host_positions[row].index_select(0, index),
                    n_tokens=len(chunk),
                    offset=offsets[row],
                    fingerprint=fingerprint,
                )
            )
        return results

    def _anchor_additions(self, anchors: list[list[int]], width: int) -> torch.Tensor:
        """[batch, width, hidden]: the anchor embedding at anchor positions, zero elsewhere
        (row k of a per-slot table at the k-th anchor)."""
        rows = torch.zeros(len(anchors), width, dtype=torch.long, device=self.device)
        is_anchor = torch.zeros(len(anchors), width, 1, dtype=self.anchor_embedding.dtype, device=self.device)
        last_row = self.anchor_embedding.shape[0] - 1
        for b, idx in enumerate(anchors):
            index = torch.as_tensor(idx, device=self.device)
            is_anchor[b, index] = 1
            if self.config.anchor_embedding == "per_slot":
                rows[b, index] = torch.arange(len(idx), device=self.device).clamp_max(last_row)
        return self.anchor_embedding[rows] * is_anchor

    # -- save / load ------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, dtype: str | torch.dtype | None = None,
                        share_weights_with: str | os.PathLike | None = None) -> Path:
        """Write ``config.json`` + ``compressor.safetensors`` (anchor embedding, LoRA), in ``dtype``
        if given (a floating-point ``torch.dtype`` or its name, as everywhere: bfloat16 halves a
        shipped artefact; the rounded weights are another compressor, and the fingerprint recorded
        is theirs).

        ``share_weights_with`` names a checkpoint directory beside ``directory`` (same parent) whose
        weights file holds exactly the bytes this save would write: only ``config.json`` is written,
        naming that directory (``weights_from``) instead of a second copy of the weights. It makes a
        variant that differs in settings only (``refine_steps``, say) without doubling what ships;
        the two directories are then copied together. Other weights than the sibling's are refused.

        Safe to kill at any point, also over an existing checkpoint: config.json records the
        weights' hash and is the one commit point. The new weights go first to a pending file
        beside the old ones (the old checkpoint still reads as it was), then config.json (from
        then on the new one reads, from the pending file), then the pending file is renamed over
        the old weights. Replacing the weights before config.json would leave the old config
        beside the new weights, which the hash check refuses as corrupt. Each file is written to
        a temp name, fsynced and renamed, so a reader never pairs a config with other weights."""
        directory = Path(os.path.expanduser(directory))  # "~/x" is the home folder's, as everywhere
        if dtype is not None:
            if dtype == "auto":  # would choose by machine: the same compressor saved as others elsewhere
                raise InvalidInputError("dtype='auto' would save in what this machine computes in, another "
                                        "compressor on another machine: name the dtype (torch.bfloat16) or "
                                        "leave it out")
            dtype = resolve_dtype(dtype, self.device)
            if not dtype.is_floating_point:
                raise InvalidInputError(f"dtype={dtype} would round the trained weights to integers: save in a "
                                        "floating-point dtype (torch.bfloat16, torch.float32) or leave dtype out")
        if directory.exists() and not directory.is_dir():
            raise InvalidInputError(f"{directory} is a file: save_pretrained writes a directory, so pass a path "
                                    "that is a directory or does not exist yet")
        _check_not_foreign(directory)
        sibling = None if share_weights_with is None else _weights_sibling(directory, share_weights_with)
        made = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        try:
            self._write_checkpoint(directory, dtype, sibling)
        except (OSError, InvalidInputError) as err:  # e.g. a full disk: the path is named, and a directory made
            if made:                                  # for it goes again
                shutil.rmtree(directory, ignore_errors=True)
            if isinstance(err, InvalidInputError):
                raise
            why = f"cannot save the compressor to {directory}: {err.strerror or err}"
            raise CheckpointWriteError(err.errno, f"{why}; make room there (or choose another directory), then "
                                                  "save again") from err
        return directory

    def _saved_weights(self, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], bytes]:
        """The trained tensors in ``dtype`` and the weights file ``save_pretrained`` writes of them."""
        tensors = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in self.trainable_tensors().items()}
        return tensors, st_save(tensors, metadata={"format": "sac-compressor/1"})

    def weights_sha256(self, dtype: str | torch.dtype | None = None) -> str:
        """The weights hash a ``save_pretrained`` in ``dtype`` records (``config.json``'s
        ``weights_sha256``), e.g. to tell whether a saved checkpoint holds these very weights."""
        dtype = None if dtype is None else resolve_dtype(dtype, self.device)
        return hashlib.sha256(self._saved_weights(dtype)[1]).hexdigest()

    def _write_checkpoint(self, directory: Path, dtype: torch.dtype | None, sibling: Path | None) -> None:
        """``save_pretrained``'s writes into ``directory``, which exists (the weights into ``sibling``'s
        file instead, when given: it must hold them already)."""
        tensors, weights = self._saved_weights(dtype)
        meta = {
            "format": "sac-compressor/1",
            "config": self.config.to_dict(),
            **base_record(self.base_fingerprint, self._base_fingerprint_float16),
            "fingerprint": self._fingerprint_of(tensors),
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            **({WEIGHTS_FROM: sibling.name} if sibling is not None else {}),
            **({RECOMMENDED_DECODING: self._recommended_decoding} if self._recommended_decoding else {}),
        }
        _finish_killed_save(directory)  # else the pending weights config.json names would be overwritten
        _warn_variants_left_behind(directory, meta["weights_sha256"])
        if sibling is not None and _read_config(sibling)["weights_sha256"] != meta["weights_sha256"]:
            raise InvalidInputError(f"share_weights_with={str(sibling)!r} holds other weights than this compressor "
                                    "(in this dtype): save the weights themselves, or pass the dtype that "
                                    "checkpoint was saved in")
        if sibling is None:
            atomic_write(directory / PENDING_WEIGHTS_FILE, weights)
        atomic_write(directory / CONFIG_FILE, json.dumps(meta, indent=2).encode())  # the commit point
        if sibling is None:
            os.replace(directory / PENDING_WEIGHTS_FILE, directory / WEIGHTS_FILE)
        else:
            for stale in (PENDING_WEIGHTS_FILE, WEIGHTS_FILE):  # an earlier save's, no longer named
                (directory / stale).unlink(missing_ok=True)
        fsync_dir(directory)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = DEFAULT_COMPRESSOR,
        model=None,
        tokenizer=None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        anchor_selector: AnchorSelector | None = None,
    ) -> SACCompressor:
        """Load a compressor directory, or a built-in one by short name (see ``list_pretrained``).
        Refuses a checkpoint made for another base model, naming both fingerprints."""
        directory = resolve_pretrained(name_or_path)
        meta, data = _read_checkpoint(directory)
        config = _checkpoint_config(meta, directory)
        advice = f"load it with base model {config.base_model!r} or train a compressor for this model"
        if model is not None and tokenizer is not None:  # refused before its adapters go into the caller's model
            _check_no_adapters(model)
            _base_fingerprint_for(base_model_fingerprint(model, tokenizer), meta, directory, advice,
                                  model.get_input_embeddings().weight.dtype)
        compressor = cls(config, model=model, tokenizer=tokenizer, device=device, dtype=dtype,
                         anchor_selector=anchor_selector)
        compressor.base_fingerprint = _base_fingerprint_for(compressor.base_fingerprint, meta, directory, advice,
                                                            compressor.dtype)
        compressor._load_tensors(st_load(data), directory)
        compressor._recommended_decoding = dict(meta.get(RECOMMENDED_DECODING, {}))  # checked by _read_config
        return compressor

    def load_weights(self, directory: str | os.PathLike) -> None:
        """Load trained tensors from a checkpoint of the *same* configuration and base model into
        this compressor (used to resume training)."""
        directory = Path(directory)
        meta, data = _read_checkpoint(directory)
        # The base model is compared by its fingerprint below (its name may differ: a moved directory).
        if _without_base_model(meta["config"]) != _without_base_model(self.config.to_dict()):
            raise CheckpointError(f"{directory} was saved with other settings than this compressor")
        _base_fingerprint_for(self.base_fingerprint, meta, directory, "resume with the base model the checkpoint "
                              "was trained on, or start a new run")
        self._load_tensors(st_load(data), directory)

    @property
    def template(self):
        return self.config.prompt

    def _load_tensors(self, tensors: dict[str, torch.Tensor], source: Path) -> None:
        shapes = {name: tuple(t.shape) for name, t in self.trainable_tensors().items()}
        expected = set(shapes)
        if set(tensors) != expected:
            raise CheckpointError(
                f"{source} holds tensors {sorted(set(tensors) ^ expected)[:5]} that do not fit this "
                f"configuration; it is corrupt or from an incompatible version"
            )
        # Same names, other shapes: settings (a rank, a per-slot table's ratio) edited apart from the weights.
        misfits = [f"{name} {tuple(t.shape)} (expected {shapes[name]})" for name, t in tensors.items()
                   if tuple(t.shape) != shapes[name]]
        if misfits:
            raise CheckpointError(f"{source} holds tensors whose shapes do not fit its settings, e.g. {misfits[0]}: "
                                  f"its {CONFIG_FILE} was edited or comes from another checkpoint; copy it again")
        with torch.no_grad():
            self.anchor_embedding.copy_(tensors.pop("anchor_embedding").to(self.anchor_embedding.dtype))
        for prefix, adapter in (("lora.", "default"), ("decoder_lora.", "decoder")):
            part = {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}
            if part:
                self.set_adapter_weights(part, adapter)


@contextlib.contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode (no dropout) for the block; afterwards each of its submodules gets its
    own flag back. A compressor in training has its adapters in training mode and the base model it
    shares with the decoder not: one flag for the whole would switch the base model's dropout on."""
    training = [sub for sub in module.modules() if sub.training]
    for sub in training:  # what module.eval() does, without walking (and calling train() on) every submodule
        sub.training = False
    try:
        yield
    finally:
        for sub in training:
            sub.training = True


# A batch is closed early where padding its chunks to the longest would add more than this share
# to their tokens: a padded position costs a whole token's forward pass, and on a CPU batching
# equal lengths saves only about 5%.
MAX_PADDING = 0.25


def _padding_bounded(order: Sequence[int], lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """``order`` (indices sorted by length) in batches of at most ``batch_size`` chunks, each closed
    before padding to its longest chunk would add more than ``MAX_PADDING`` to its tokens."""
    batch: list[int] = []
    tokens = 0
    for i in order:  # each chunk is the longest of the batch so far
        padded = lengths[i] * (len(batch) + 1)
        if batch and (len(batch) == batch_size or padded > (1 + MAX_PADDING) * (tokens + lengths[i])):
            yield batch
            batch, tokens = [], 0
        batch.append(i)
        tokens += lengths[i]
    if batch:
        yield batch


def _checked_token_ids(chunks: Iterable, vocabulary: int) -> list[list[int]]:
    """Each chunk as a list of token ids, each an integer (numpy's too, not a float: a float id is
    no token) in ``0 .. vocabulary - 1``, the rows of the model's embedding."""
    checked = []
    for i, chunk in enumerate(chunks):
        if isinstance(chunk, (str, bytes)) or not isinstance(chunk, Iterable):
            raise InvalidInputError(f"chunk {i} is a {type(chunk).__name__}: a chunk is a list of token ids "
                                    "(for text use compress(text))")
        ids = []
        for token in chunk:
            try:  # any integer (numpy's, a 0-d tensor's) but a bool or a float
                value = None if isinstance(token, bool) else operator.index(token)
            except TypeError:
                value = None
            if value is None or not 0 <= value < vocabulary:
                raise InvalidInputError(f"chunk {i} holds {token!r}, which is no token id: ids are integers from 0 "
                                        f"to {vocabulary - 1} (the model's embedding rows)")
            ids.append(value)
        checked.append(ids)
    return checked


def _chunk_offsets(n_chunks: int, offsets: Sequence[int] | None) -> list[int]:
    """Where each of ``n_chunks`` chunks starts (0 for all if not given), one non-negative integer
    per chunk: a count that differs would pair chunks with other chunks' offsets or leave some
    without one, and a negative offset puts the chunk's keys at positions no prompt has."""
    if offsets is None:
        return [0] * n_chunks
    given = list(offsets)
    if len(given) != n_chunks:
        raise InvalidInputError(f"got {len(given)} offsets for {n_chunks} chunks: give one offset per chunk "
                                "(or none, for offset 0)")
    checked = []
    for i, offset in enumerate(given):
        try:  # any integer (numpy's, a 0-d tensor's) but a bool or a float
            position = -1 if isinstance(offset, bool) else operator.index(offset)
        except TypeError:
            position = -1
        if position < 0:
            raise InvalidInputError(f"offset {i} is {offset!r}: an offset is the position of the chunk's first "
                                    "token, an integer >= 0")
        checked.append(position)
    return checked


def _widened_alpha(adapter: str, rank: int, new_rank: int, alpha: int) -> int:
    """The alpha that keeps alpha / rank when an adapter grows from ``rank`` to ``new_rank``."""
    if not rank or new_rank < rank:
        raise InvalidInputError(f"cannot widen the {adapter} LoRA from rank {rank} to {new_rank}: the new rank "
                                f"must be at least the current one (and the adapter must exist)")
    if (alpha * new_rank) % rank:
        raise InvalidInputError(f"the {adapter} LoRA's alpha {alpha} x {new_rank} / {rank} is not an integer: "
                                f"choose a rank that keeps alpha / rank exact")
    return alpha * new_rank // rank


def _lora_config(rank: int, alpha: int, config: SACConfig):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), bias="none")


def _biased_bidirectional_mask(mask: torch.Tensor, future_bias: float, dtype: torch.dtype) -> torch.Tensor:
    """Additive [batch, 1, T, T] mask: 0 for earlier keys, -future_bias for later keys, -inf-like
    for padding keys."""
    width = mask.shape[1]
    later = torch.ones(width, width, dtype=torch.bool, device=mask.device).triu(1)
    bias = torch.zeros(width, width, dtype=dtype, device=mask.device).masked_fill(later, -future_bias)
    padding = (mask[:, None, None, :] == 0)
    return bias[None, None].expand(mask.shape[0], 1, width, width).masked_fill(padding, torch.finfo(dtype).min)


def list_pretrained() -> list[str]:
    """Short names of the compressors shipped inside the package."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / CONFIG_FILE).exists())


def builtin_named(fingerprint: str) -> str | None:
    """The short name of the built-in compressor whose recorded fingerprint is ``fingerprint``, if any."""
    for name in list_pretrained():
        try:
            if checkpoint_meta(name).get("fingerprint") == fingerprint:
                return name
        except CheckpointError:
            continue
    return None


def resolve_pretrained(name_or_path: str | os.PathLike) -> Path:
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise InvalidInputError(f"expected a directory or a built-in name, got {type(name_or_path).__name__}")
    path = Path(os.path.expanduser(name_or_path))
    if (path / CONFIG_FILE).exists():
        return path
    builtin = PRETRAINED_DIR / str(name_or_path)
    if (builtin / CONFIG_FILE).exists():
        return builtin
    if path.is_file() and (path.parent / CONFIG_FILE).exists():
        raise CheckpointError(f"{str(name_or_path)!r} is a file of a compressor checkpoint: pass its directory, "
                              f"{str(path.parent)!r}")
    saved = [str(path / name) for name in ("best", "final") if (path / name / CONFIG_FILE).exists()]
    if saved:
        raise CheckpointError(f"{str(name_or_path)!r} is a training run's directory (python -m sac_rag.train "
                              f"--out-dir): pass the compressor it saved, {' or '.join(map(repr, saved))}")
    set_aside = sorted(path.parent.glob(f".old-{path.name}-*/{CONFIG_FILE}")) if path.name else []
    if set_aside and not path.exists():
        raise CheckpointError(
            f"{str(name_or_path)!r} is missing, but a training run set its previous version aside as "
            f"{str(set_aside[0].parent)!r}: the run is replacing it (retry in a moment), or was killed while doing so "
            f"(python -m sac_rag.train --resume on that run puts it back, as does renaming that directory to "
            f"{path.name!r})")
    raise CheckpointError(
        f"{str(name_or_path)!r} is neither a compressor directory (with {CONFIG_FILE}) nor a built-in "
        f"compressor; built-in: {list_pretrained() or 'none installed'}"
    )


def checkpoint_meta(name_or_path: str | os.PathLike) -> dict:
    """A compressor checkpoint's ``config.json`` (settings, fingerprints, weights hash), read
    without loading any model."""
    return _read_config(resolve_pretrained(name_or_path))


def _read_config(directory: Path) -> dict:
    """``config.json``, checked to hold what a checkpoint's loader reads (a damaged or foreign file is
    refused here, naming it, rather than failing later on a missing key)."""
    path = directory / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path} ({err}): the checkpoint is damaged or was half-copied; "
                              "copy it again") from err
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if isinstance(found, str) and found.startswith("sac-compressor/") and found != "sac-compressor/1":
        raise CheckpointError(f"{directory} is a compressor checkpoint of format {found!r} (in {path}), written by "
                              "a newer sac_rag; this one reads 'sac-compressor/1': upgrade sac_rag "
                              "(pip install -U sac-rag)")
    if found != "sac-compressor/1":
        raise CheckpointError(f"{directory} is not a sac_rag compressor checkpoint (format {found!r} in {path}): "
                              "pass a directory written by SACCompressor.save_pretrained, or a built-in name "
                              f"({', '.join(list_pretrained()) or 'none installed'})")
    expected = {"config": dict, "base_fingerprint": str, "weights_sha256": str}
    damaged = [key for key, kind in expected.items() if not isinstance(meta.get(key), kind)]
    damaged += [BASE_FINGERPRINT_FLOAT16] if not isinstance(meta.get(BASE_FINGERPRINT_FLOAT16, ""), str) else []
    if damaged:
        raise CheckpointError(f"{path} lacks a valid {', '.join(map(repr, damaged))}: the checkpoint is damaged or "
                              "was edited by hand; copy it again or save it again with save_pretrained")
    source = meta.get(WEIGHTS_FROM, "checkpoint")
    if not (isinstance(source, str) and source not in ("", ".", "..") and Path(source).name == source):
        raise CheckpointError(f"{path} names {source!r} as the directory of its weights ({WEIGHTS_FROM!r}), which is "
                              "not a directory beside it: the checkpoint was edited by hand; copy it again")
    if RECOMMENDED_DECODING in meta:
        try:
            check_recommended_decoding(meta[RECOMMENDED_DECODING], str(path))
        except InvalidInputError as err:
            raise CheckpointError(f"{err}; correct it with sac_rag.compressor.recommend_decoding") from None
    return meta


def recommend_decoding(name_or_path: str | os.PathLike, settings: dict) -> dict:
    """Record in a saved compressor the decoding its scores were measured with (``settings``, say
    ``{"num_beams": 8, "mbr": True}``; ``{}`` removes it), without loading it: ``config.json`` is
    rewritten atomically, the weights and fingerprint stay as they are. Returns the new ``config.json``."""
    directory = resolve_pretrained(name_or_path)
    meta = _read_config(directory)
    meta.pop(RECOMMENDED_DECODING, None)
    settings = check_recommended_decoding(settings, "recommend_decoding's settings")
    if settings:
        meta[RECOMMENDED_DECODING] = settings
    atomic_write(directory / CONFIG_FILE, json.dumps(meta, indent=2).encode())
    return meta


def _check_not_foreign(directory: Path) -> None:
    """Refuse to save into a directory whose ``config.json`` is another program's (a Hugging Face
    model's, say): the save would replace it. A compressor checkpoint's, or one that does not parse
    as JSON at all, may be replaced."""
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if found != "sac-compressor/1":
        raise InvalidInputError(f"{directory} holds a {CONFIG_FILE} that is not a compressor checkpoint's (format "
                                f"{found!r}), which saving here would replace: save into another directory")


def _recorded_weights_hash(directory: Path) -> str | None:
    """The weights hash a checkpoint's ``config.json`` records (None if there is none to read)."""
    try:
        return _read_config(directory)["weights_sha256"]
    except CheckpointError:
        return None


def _weights_sibling(directory: Path, share_weights_with: str | os.PathLike) -> Path:
    """The checkpoint directory ``save_pretrained(share_weights_with=...)`` names, refused unless it
    holds its own weights beside ``directory``: a reader finds them by name in the same parent."""
    sibling = resolve_pretrained(share_weights_with).resolve()  # its own name, as a reader finds it (not ".")
    if sibling == directory.resolve() or sibling.parent != directory.resolve().parent:
        raise InvalidInputError(f"share_weights_with={str(share_weights_with)!r} is not a checkpoint beside "
                                f"{directory} (another directory in {directory.parent}): save the weights themselves, "
                                "or save beside the checkpoint that holds them")
    reads = _read_config(sibling).get(WEIGHTS_FROM)
    if reads is not None:
        raise InvalidInputError(f"share_weights_with={str(share_weights_with)!r} holds no weights itself (it reads "
                                f"{reads!r}'s): name that checkpoint instead")
    return sibling


def variants_reading(directory: str | os.PathLike) -> list[Path]:
    """The checkpoints beside ``directory`` that read its weights (``save_pretrained(share_weights_with=...)``):
    new weights saved into it leave them unreadable until they are saved again against those."""
    directory = Path(os.path.expanduser(directory)).resolve()
    found = []
    for config in sorted(directory.parent.glob(f"*/{CONFIG_FILE}")):
        try:
            names = json.loads(config.read_text()).get(WEIGHTS_FROM) == directory.name
        except (OSError, ValueError, AttributeError):
            continue
        if names and config.parent != directory:
            found.append(config.parent)
    return found


def _warn_variants_left_behind(directory: Path, weights_sha256: str) -> None:
    """Say which variants beside ``directory`` a save of other weights into it leaves unreadable."""
    held = _recorded_weights_hash(directory)
    variants = variants_reading(directory) if held not in (None, weights_sha256) else []
    if variants:
        logger.warning("%s now gets other weights, which %s read (%r in their %s): they will be refused until saved "
                       "again against the new weights (save_pretrained(share_weights_with=...))", directory,
                       ", ".join(map(str, variants)), WEIGHTS_FROM, CONFIG_FILE)


def _finish_killed_save(directory: Path) -> None:
    """Rename into place weights that a save killed after committing its config.json left pending
    (``save_pretrained``), so that the next save, which writes its own pending weights, does not
    replace the only copy of the weights config.json names. Pending weights config.json does not
    name (a save killed before its commit) are left to be overwritten."""
    pending = directory / PENDING_WEIGHTS_FILE
    if not pending.exists():
        return
    try:
        meta = _read_config(directory)
        committed = hashlib.sha256(pending.read_bytes()).hexdigest() == meta["weights_sha256"]
    except (CheckpointError, OSError):
        return
    if committed:
        os.replace(pending, directory / WEIGHTS_FILE)
        fsync_dir(directory)


def _checkpoint_config(meta: dict, directory: Path) -> SACConfig:
    """The settings a checkpoint's ``config.json`` holds, refused naming the file if unusable."""
    try:
        return SACConfig.from_dict(meta["config"])
    except (InvalidInputError, TypeError) as err:
        raise CheckpointError(f"{directory / CONFIG_FILE} holds settings this sac_rag cannot use: {err}") from err


def _read_checkpoint(directory: Path) -> tuple[dict, bytes]:
    """``config.json`` and the weights it records, read as one checkpoint. A save that commits between
    reading the two (``save_pretrained`` from another process) is read again, once."""
    meta = _read_config(directory)
    try:
        return meta, _read_weights(directory, meta)
    except CheckpointError:
        again = _read_config(directory)
        if again == meta:
            raise
        return again, _read_weights(directory, again)


def _read_weights(directory: Path, meta: dict) -> bytes:
    """The weights' bytes, checked against the hash ``config.json`` records. They are in
    ``compressor.safetensors``, or still in the pending file when a save was killed after writing
    config.json and before renaming them into place (``save_pretrained``); the rename may also
    happen while this reads, hence the second look at the weights file."""
    source, copy_again = directory, "copy it again"
    if WEIGHTS_FROM in meta:  # a variant in settings only, reading its sibling's weights (save_pretrained)
        source = directory.resolve().parent / meta[WEIGHTS_FROM]  # "." has a parent too
        copy_again = (f"{directory} reads its weights from {source} ({WEIGHTS_FROM!r} in its {CONFIG_FILE}): copy "
                      "the two directories together")
    found = None
    for name in (WEIGHTS_FILE, PENDING_WEIGHTS_FILE, WEIGHTS_FILE):
        try:
            data = (source / name).read_bytes()
        except FileNotFoundError:
            continue
        except OSError as err:
            raise CheckpointError(f"cannot read {source / name} ({err.strerror or err}): the checkpoint is "
                                  f"incomplete; {copy_again}") from err
        if hashlib.sha256(data).hexdigest() == meta["weights_sha256"]:
            return data
        found = name if found is None else found
    if found is None:
        raise CheckpointError(f"cannot read {source / WEIGHTS_FILE} (it does not exist): the checkpoint is "
                              f"incomplete; {copy_again}")
    if WEIGHTS_FROM in meta and _recorded_weights_hash(source) not in (None, meta["weights_sha256"]):
        raise CheckpointError(
            f"{directory} reads its weights from {source} ({WEIGHTS_FROM!r} in its {CONFIG_FILE}), which holds other "
            f"weights since {directory} was saved (another {CONFIG_FILE} hash): save the variant again from the "
            "compressor it is a variant of (save_pretrained(share_weights_with=...)), or put back the weights it "
            "was saved against")
    raise CheckpointError(
        f"{source / WEIGHTS_FILE} does not match the hash in {directory / CONFIG_FILE}: the checkpoint "
        f"is corrupt or was half-copied; {copy_again}"
    )
