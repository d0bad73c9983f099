"""Exact re-positioning of cached keys for RoPE models.

A key cached at position p carries the rotation R(p). Rotations compose, R(p + d) = R(d) R(p),
so a chunk encoded once at positions 0..n-1 can be placed at any offset d by rotating its
stored keys by d (METHOD.md, "Positions"). Values carry no position and stay as they are.

``KeyRotator.from_model`` reads how the model rotates its keys from the model itself: the
frequencies of its rotary module (per layer type; the unscaled ones of dynamic RoPE), how many
dimensions are rotated (partial rotary embeddings rotate the first ones), how they are paired
(halves as in Llama, or neighbours as in GPT-J, Cohere and GLM), which layers apply RoPE at all,
and where the rotated part is cached (multi-head latent attention caches it beside the latent).
Any attention scaling a RoPE variant applies to cos/sin is already in the cached keys and
commutes with the rotation. A model whose positions cannot be moved this way exactly is refused
when the compressor or generator is built (``UnsupportedModelError``), naming why.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import textwrap

import torch

from .errors import InvalidInputError, UnsupportedModelError

# RoPE variants whose frequencies do not depend on the sequence length: rotation is exact.
_STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn", "proportional"}
# Variants that switch frequencies once a forward pass reaches a sequence length: exact below it.
_LENGTH_DEPENDENT_ROPE_TYPES = {"dynamic", "longrope"}
# Cache layers that hold one key and one value per token (HF's layer types).
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}
_WHY_LAYER_TYPE = {
    "conv": "convolution layers keep a running state instead of per-token keys and values",
    "linear_attention": "recurrent layers (state-space or linear attention) keep a running state instead of "
                        "per-token keys and values",
    "hybrid": "its layers run a recurrent (state-space) branch beside attention, whose running state is not "
              "per-token keys and values",
    "hybrid_sliding": "its layers run a recurrent (state-space) branch beside attention, whose running state is "
                      "not per-token keys and values",
    "chunked_attention": "chunked attention lets a token see only the tokens in its own block of absolute "
                         "positions, and moving a chunk changes which block it falls in",
    "dummy": "some layers keep no keys and values of their own (they reuse another layer's, or have no "
             "attention)",
}
# Functions (in a model's modelling module) that rotate keys and return them in the layout named:
# False = the two halves of the rotary dimensions pair up (Llama), True = neighbours pair up (GPT-J).
_ROTATING_FUNCTIONS = {
    "apply_rotary_pos_emb_interleave": False,  # DeepSeek: takes neighbour pairs, returns them as halves
    "_apply_rotary_emb": False,  # gpt-oss: torch.chunk(x, 2) halves
}
# Names a condition on applying RoPE may use besides the attention module (``self``).
_CONDITION_NAMES = {"self", "alibi", "None", "True", "False", "getattr", "hasattr", "isinstance", "len"}


class KeyRotator:
    """Rotates keys of shape ``[layers, kv_heads, tokens, head_dim]`` (or with a leading batch
    dimension on each layer) by a position delta. Built from a loaded model (``from_model``).

    ``inv_freq_per_layer``: ``[layers, rotary_dim // 2]`` frequencies; a row of zeros leaves a
    layer's keys as they are (a layer without RoPE). ``interleaved``: rotary dimensions pair up as
    neighbours (2i, 2i+1) instead of halves (i, i + rotary_dim/2). ``rotates_values``: the rotated
    part is cached in the value slot (multi-head latent attention caches the latent as "keys" and
    the rotated key part as "values"). ``position_limit``: the sequence length from which the
    model's frequencies may change (dynamic RoPE), so a chunk must end before it (``check_positions``)."""

    def __init__(self, inv_freq_per_layer: torch.Tensor, interleaved: bool = False,
                 rotates_values: bool = False, position_limit: int | None = None):
        # [layers, rotary_dim // 2], float64 so that large offsets lose no precision.
        self.inv_freq = inv_freq_per_layer.detach().to(torch.float64).cpu()
        self.interleaved = interleaved
        self.rotates_values = rotates_values
        self.position_limit = position_limit
        self.model_kind = "this model"

    @classmethod
    def from_model(cls, model) -> KeyRotator:
        config = model.config.get_text_config(decoder=True)
        kind = _kind(model, config)
        _check_layer_types(config, kind)
        if getattr(config, "alibi", False):
            raise _alibi_error(kind, "is configured with ALiBi (alibi=True)")
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        rotary = getattr(decoder, "rotary_emb", None)
        if rotary is None:
            raise _no_rotary_error(model, decoder, kind)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        attentions = _attention_modules(decoder, config.num_hidden_layers)
        dynamic = False
        rows = []
        for layer_type, attention in zip(layer_types, attentions):
            rope_type, params = _rope_type(config, layer_type)
            if rope_type in _LENGTH_DEPENDENT_ROPE_TYPES:
                _check_length_dependent(rope_type, params, config, kind)
                dynamic = dynamic or rope_type == "dynamic"
            elif rope_type not in _STATIC_ROPE_TYPES:
                raise UnsupportedModelError(
                    f"{kind} uses RoPE type {rope_type!r}, whose frequencies SAC cannot read or which change with "
                    f"the sequence length, so cached keys cannot be moved exactly; use a model with one of "
                    f"{sorted(_STATIC_ROPE_TYPES | _LENGTH_DEPENDENT_ROPE_TYPES)}")
            inv_freq = _inv_freq(rotary, layer_type, kind).float()
            if attention is not None and not _applies_rope(attention, kind):
                inv_freq = torch.zeros_like(inv_freq)  # a layer without RoPE: its keys carry no position
            rows.append(inv_freq)
        sizes = sorted({r.numel() for r in rows})
        if len(sizes) > 1:
            raise UnsupportedModelError(
                f"{kind} rotates a different number of key dimensions in different layers ({sizes} frequencies, "
                "e.g. larger heads in its global layers); SAC keeps chunks as one key size for all layers")
        rotates_values = _latent_attention(config, rows[0].numel(), kind)
        rotator = cls(torch.stack(rows), interleaved=_interleaved(attentions, decoder, kind),
                      rotates_values=rotates_values,
                      position_limit=getattr(config, "max_position_embeddings", None) if dynamic else None)
        rotator.model_kind = kind
        return rotator

    @property
    def num_layers(self) -> int:
        return self.inv_freq.shape[0]

    def rotate(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """Keys rotated from their positions p to p + delta (``delta`` may be negative)."""
        if delta == 0:
            return keys
        if keys.shape[0] != self.num_layers:
            raise ValueError(f"keys have {keys.shape[0]} layers, this model has {self.num_layers}")
        if keys.shape[-1] < 2 * self.inv_freq.shape[-1]:
            raise ValueError(f"keys of width {keys.shape[-1]} are narrower than this model's "
                             f"{2 * self.inv_freq.shape[-1]} rotary dimensions")
        angles = float(delta) * self.inv_freq  # [L, R/2]
        half = angles.shape[-1]
        shape = [keys.shape[0]] + [1] * (keys.dim() - 2) + [half]
        cos = angles.cos().to(keys.device, torch.float32).view(shape)
        sin = angles.sin().to(keys.device, torch.float32).view(shape)
        k = keys.float()
        k_rot, k_pass = k[..., : 2 * half], k[..., 2 * half :]
        if self.interleaved:  # (x0, x1), (x2, x3), ... each turned by one frequency
            x1, x2 = k_rot[..., 0::2], k_rot[..., 1::2]
            rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        else:  # HF's rotate_half layout: (x_i, x_{i + R/2})
            x1, x2 = k_rot[..., :half], k_rot[..., half:]
            rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return torch.cat([rotated, k_pass], dim=-1).to(keys.dtype)

    def move(self, keys: torch.Tensor, values: torch.Tensor, delta: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's cached ``(keys, values)`` moved by ``delta`` positions: the tensor that carries
        the rotation is rotated, the other returned as it is."""
        if delta == 0:
            return keys, values
        if self.rotates_values:
            if values.shape[-1] != 2 * self.inv_freq.shape[-1]:  # MLA's rotated part is all of what is cached
                raise ValueError(f"values of width {values.shape[-1]} are not this model's rotated key part "
                                 f"({2 * self.inv_freq.shape[-1]} wide)")
            return keys, self.rotate(values, delta)
        return self.rotate(keys, delta), values

    def check_positions(self, end: int) -> None:
        """Refuse to encode tokens at positions up to ``end`` (exclusive) where the model's own
        frequencies may differ from the ones chunks are moved with. Dynamic RoPE picks the
        frequencies of a whole forward pass from its furthest position: past
        ``max_position_embeddings`` they grow, and once grown (by any earlier long pass of the same
        model) they go back to the base ones only in a pass that ends *before* that length, so a
        chunk must end there."""
        if self.position_limit is not None and end >= self.position_limit:
            raise InvalidInputError(
                f"{self.model_kind} uses dynamic RoPE, whose frequencies depend on how far a sequence reaches "
                f"(they are the base ones only before its max_position_embeddings={self.position_limit}); a chunk "
                f"reaching position {end - 1} could be encoded with other frequencies than the ones it is moved and "
                f"read with. Compress texts of at most {self.position_limit - 1} tokens (split longer ones into "
                "separate texts)")


def _kind(model, config) -> str:
    return f"model type {getattr(config, 'model_type', None) or '?'!r} ({type(model).__name__})"


def _check_layer_types(config, kind: str) -> None:
    """Every layer must cache one key and one value per token (full or sliding attention)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        layer_types = get_layer_types_and_kwargs(config)[0]
    except Exception:  # an older transformers, or a config it cannot read: what the config says
        layer_types = getattr(config, "layer_types", None) or []
    other = sorted(set(layer_types) - _ATTENTION_LAYER_TYPES)
    if other:
        why = "; ".join(_WHY_LAYER_TYPE.get(t, f"SAC does not know how {t!r} layers cache tokens") for t in other)
        raise UnsupportedModelError(
            f"{kind} has layers of type {other}: {why}. SAC compresses a chunk into the keys and values of a few "
            "of its tokens in every layer and needs a model whose layers are all (full or sliding-window) attention")


def _alibi_error(kind: str, how: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{kind} {how}: positions enter as an attention bias computed from where keys sit in the cache, not as a "
        "rotation of the keys, so a compressed chunk (fewer cache entries than tokens) would be read at wrong "
        "distances; SAC needs a model with rotary position embeddings (RoPE: e.g. Llama, Qwen, Mistral, Gemma, "
        "Phi-3, or Falcon with alibi=False)")


def _no_rotary_error(model, decoder, kind: str) -> UnsupportedModelError:
    module = sys.modules.get(type(decoder).__module__)
    if any("alibi" in name.lower() and callable(obj) for name, obj in vars(module or object).items()):
        return _alibi_error(kind, "uses ALiBi")  # Bloom, MPT: their modelling code builds the bias
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    learned = [name for name, module in decoder.named_modules()
               if isinstance(module, torch.nn.Embedding) and module is not inputs
               and any(word in name.lower() for word in ("pos", "wpe"))]
    if learned:
        return UnsupportedModelError(
            f"{kind} adds learned absolute position embeddings (`{learned[0]}`) to its token embeddings, so every "
            "layer's keys and values depend on absolute positions and no rotation can move a chunk; SAC needs a "
            "model with rotary position embeddings (RoPE: e.g. Llama, Qwen, Mistral, Gemma, Phi-3)")
    return UnsupportedModelError(
        f"{kind} has no rotary embedding module (`rotary_emb`), so SAC cannot tell how its keys carry positions "
        "or move a chunk to another position; SAC needs a model with rotary position embeddings (RoPE)")


def _rope_type(config, layer_type: str) -> tuple[str, dict]:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    return params.get("rope_type", "default"), params


def _check_length_dependent(rope_type: str, params: dict, config, kind: str) -> None:
    """Dynamic NTK RoPE equals its base RoPE in a forward pass that ends before
    max_position_embeddings, where the compressor keeps its chunks (``check_positions``; the
    generator refuses longer prompts). LongRoPE switches to its long factors once a forward
    pass passes original_max_position_embeddings, which a prompt may: only a model that stops
    there is exact."""
    if rope_type == "dynamic":
        return
    original = params.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings",
                                                                          None)
    longest = getattr(config, "max_position_embeddings", None)
    if original is None or longest is None or longest > original:
        factor = params.get("factor") or (longest / original if longest and original else None)
        raise UnsupportedModelError(
            f"{kind} uses LongRoPE, which switches to other frequencies once a sequence passes "
            f"original_max_position_embeddings={original} (it has max_position_embeddings={longest}): keys cached "
            "before the switch no longer match the ones the model computes after it, so chunks cannot be moved "
            f"exactly. Load it with max_position_embeddings={original} and rope_parameters['factor']={factor} (config "
            "overrides to from_pretrained; then pass it as model=): the same model within its first positions, which "
            "SAC then keeps to. Or use its short-context variant")


def _inv_freq(rotary, layer_type: str, kind: str) -> torch.Tensor:
    """The frequencies the model rotates keys of this layer type with. ``original_inv_freq`` is what
    dynamic RoPE uses below its length limit (``inv_freq`` may hold grown frequencies from an
    earlier long pass, until the next short one resets it)."""
    for prefix in (f"{layer_type}_", ""):
        for name in ("original_inv_freq", "inv_freq"):
            found = getattr(rotary, prefix + name, None)
            if isinstance(found, torch.Tensor):
                return found
    table = getattr(rotary, "embed_positions", None)  # GPT-J, CodeGen: a table of [sin | cos] per position
    if isinstance(table, torch.Tensor) and table.dim() == 2 and table.shape[0] > 1:
        sin, cos = table[1].double().chunk(2)
        return torch.atan2(sin, cos)  # the angle at position 1: the frequencies themselves
    raise UnsupportedModelError(
        f"{kind}: its rotary embedding module ({type(rotary).__name__}) has no inverse frequencies (`inv_freq`) "
        "SAC can read, so it cannot rotate cached keys the way the model does")


def _attention_modules(decoder, num_layers: int) -> list:
    """Each layer's attention module (None where it cannot be found)."""
    for child in decoder.children():
        if isinstance(child, torch.nn.ModuleList) and len(child) == num_layers:
            return [next((m for m in layer.children() if "attention" in type(m).__name__.lower()), None)
                    for layer in child]
    return [None] * num_layers


def _applies_rope(attention, kind: str) -> bool:
    """Whether this attention module rotates its keys: read from its ``forward``, where some
    models apply RoPE only under a condition on the layer (SmolLM3's ``use_rope``, Cohere2's and
    EXAONE 4's sliding-window layers). Each condition on the way to a rotary call is evaluated on
    the module; one that depends on anything else is refused, since SAC could not tell which
    layers' keys carry positions."""
    paths = _rope_conditions(type(attention))
    if not paths:
        return True  # no rotary call in forward (or no source to read): every layer, as the rotary module says
    env = {"self": attention, "alibi": None, "getattr": getattr, "hasattr": hasattr, "isinstance": isinstance,
           "len": len}
    for tests in paths:
        for test in tests:
            names = {n.id for n in ast.walk(test) if isinstance(n, ast.Name)}
            if names - _CONDITION_NAMES:
                raise UnsupportedModelError(
                    f"{kind} applies rotary embeddings in a layer only if `{ast.unparse(test)}`, which depends on "
                    "what its decoder passes each layer; SAC cannot tell which layers' keys carry positions, and "
                    "rotating keys that carry none would corrupt them. Use a model that applies RoPE in every "
                    "layer, or decides it by a setting of the layer itself (as SmolLM3's `use_rope`)")
        try:
            if all(_holds(test, env) for test in tests):
                return True
        except Exception as err:
            raise UnsupportedModelError(
                f"{kind} applies rotary embeddings only under conditions SAC cannot evaluate "
                f"({' and '.join(ast.unparse(t) for t in tests)}: {err}), so it cannot tell which layers' keys "
                "carry positions; use a model that applies RoPE in every layer") from err
    return False


def _holds(test: ast.expr, env: dict) -> bool:
    code = compile(ast.fix_missing_locations(ast.Expression(body=test)), "<rope condition>", "eval")
    return bool(eval(code, {"__builtins__": {}}, env))  # noqa: S307 - the model's own condition, on its module


@functools.lru_cache(maxsize=64)
def _rope_conditions(attention_cls) -> list[list[ast.expr]]:
    """For every rotary call in ``attention_cls.forward``, the ``if`` tests that lead to it (negated
    in an ``else``)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(attention_cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return []
    paths: list[list[ast.expr]] = []

    def visit(node: ast.AST, tests: list[ast.expr]) -> None:
        if isinstance(node, (ast.If, ast.IfExp)):
            body = node.body if isinstance(node.body, list) else [node.body]
            orelse = node.orelse if isinstance(node.orelse, list) else [node.orelse]
            negated = ast.copy_location(ast.UnaryOp(op=ast.Not(), operand=node.test), node.test)
            for child in body:
                visit(child, [*tests, node.test])
            for child in orelse:
                visit(child, [*tests, negated])
            return
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if "rotary" in name.lower() or "rope" in name.lower():
                paths.append(tests)
        for child in ast.iter_child_nodes(node):
            visit(child, tests)

    visit(tree, [])
    return paths


def _interleaved(attentions: list, decoder, kind: str) -> bool:
    """How the model pairs its rotary dimensions, read from its modelling module: ``rotate_half``
    (or GPT-J's ``rotate_every_two``) is probed; else a known rotating function decides."""
    owner = next((a for a in attentions if a is not None), decoder)
    module = sys.modules.get(type(owner).__module__)
    for name in ("rotate_half", "rotate_every_two"):
        fn = getattr(module, name, None)
        if callable(fn):
            out = fn(torch.arange(4.0).view(1, 1, 1, 4)).flatten().tolist()
            if out == [-2.0, -3.0, 0.0, 1.0]:
                return False
            if out == [-1.0, 0.0, -3.0, 2.0]:
                return True
            raise UnsupportedModelError(f"{kind}: its `{name}` pairs rotary dimensions in a way SAC does not know")
    for name, interleaved in _ROTATING_FUNCTIONS.items():
        if callable(getattr(module, name, None)):
            return interleaved
    fn = getattr(module, "apply_rotary_emb", None)
    if callable(fn) and "view_as_complex" in _source(fn):
        return True  # complex rotation of neighbour pairs (x0 + i x1), as in DeepSeek-V2
    raise UnsupportedModelError(
        f"{kind}: SAC cannot tell how it pairs the dimensions it rotates (its modelling code has no `rotate_half`), "
        "so it cannot rotate cached keys the way the model does")


def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def _latent_attention(config, half: int, kind: str) -> bool:
    """Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3, ...) caches the shared latent as keys
    and the rotated part of the keys (``qk_rope_head_dim`` wide) as values."""
    if not (getattr(config, "kv_lora_rank", None) and getattr(config, "qk_rope_head_dim", None)):
        return False
    if 2 * half != config.qk_rope_head_dim:
        raise UnsupportedModelError(
            f"{kind} uses latent attention with qk_rope_head_dim={config.qk_rope_head_dim} but its rotary module "
            f"has {half} frequencies; SAC cannot tell which cached dimensions carry positions")
    return True
