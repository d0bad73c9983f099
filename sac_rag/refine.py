"""Refining compressed chunks at compression time (an extension beyond the paper).

The encoder writes each chunk's anchor K/V in one forward pass. Refinement then treats those K/V
as free parameters of that one chunk and takes ``steps`` Adam steps on them so that the decoder,
reading the prompt's opening and the chunk's K/V (and nothing else), re-reads the chunk: the
objective is the cross-entropy of each of the chunk's tokens after its first one, given the
tokens before it (the autoencoding task of METHOD.md, here solved per chunk rather than learned).
No question and no answer is seen; the cache keeps its size (the same anchors, the same
positions). It costs one forward and backward pass through the decoder per step and chunk, done
once when a chunk is compressed (precompressed stores pay it offline).

Every chunk is refined where a first context sits, right after the opening, whatever its offset,
and then moved to its offset: a chunk refines to the same K/V wherever it is compressed (a store's
chunks are compressed at offset 0 and moved into place when read; one compressed in place is the
same to rounding). Adam's steps are not rotation-equivariant, so refining a chunk at its own
offset would make the two differ.

``SACConfig.refine_steps`` / ``refine_lr`` turn it on; they enter the compressor's fingerprint, so
refined and unrefined caches are never mixed in a store.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .errors import InvalidInputError
from .kv import AnchorKV

if TYPE_CHECKING:
    from .compressor import SACCompressor


def refine(compressor: SACCompressor, kvs: list[AnchorKV], chunks: list[list[int]], steps: int,
           lr: float) -> list[AnchorKV]:
    """``kvs`` (the chunks ``chunks`` as the encoder compressed them) after ``steps`` Adam steps at
    learning rate ``lr`` on their keys and values, all chunks at once (each its own loss). A chunk of
    one token has nothing to re-read and is returned as it is."""
    todo = [i for i, chunk in enumerate(chunks) if len(chunk) > 1]
    if not steps or not todo:
        return kvs
    if torch.is_inference_mode_enabled():
        raise InvalidInputError("refinement (refine_steps > 0) takes gradient steps, which torch.inference_mode() "
                                "forbids: compress outside it (torch.no_grad() is fine)")
    opening, head = _opening(compressor)
    _check_positions(compressor, len(opening) + 2 * max(len(chunks[i]) for i in todo))
    placed = [kvs[i].at_offset(len(opening), compressor.rotator) for i in todo]  # each as a first context
    keys = [kv.keys.detach().float().clone().requires_grad_(True) for kv in placed]
    values = [kv.values.detach().float().clone().requires_grad_(True) for kv in placed]
    chunks = [chunks[i] for i in todo]
    optimizer = torch.optim.Adam([*keys, *values], lr=lr)
    for _ in range(steps):
        with torch.enable_grad():
            # each chunk's mean: chunks do not weigh on each other's steps
            loss = _rereading_losses(compressor, head, keys, values, placed, chunks).sum()
            grads = torch.autograd.grad(loss, [*keys, *values])
        for param, grad in zip([*keys, *values], grads):
            param.grad = grad
        optimizer.step()
    refined = list(kvs)
    for i, kv, k, v in zip(todo, placed, keys, values):
        back = replace(kv, keys=k.detach(), values=v.detach()).at_offset(kvs[i].offset, compressor.rotator)
        refined[i] = replace(back, keys=back.keys.to(kv.keys.dtype), values=back.values.to(kv.values.dtype))
    return refined


@torch.no_grad()
def rereading_loss(compressor: SACCompressor, kv: AnchorKV, chunk: list[int]) -> float:
    """What refinement lowers: the decoder's mean cross-entropy of each of ``chunk``'s tokens after
    the first, given those before it, reading the prompt's opening and the chunk's compressed ``kv``
    (the chunk's K/V only, moved to right after the opening)."""
    opening, head = _opening(compressor)
    placed = kv.at_offset(len(opening), compressor.rotator)
    return _rereading_losses(compressor, head, [placed.keys], [placed.values], [placed], [chunk]).item()


def _opening(compressor: SACCompressor) -> tuple[list[int], tuple | None]:
    """The prompt's opening before its contexts (BOS, prefix, context prefix) and its K/V as the
    decoder reads it (None when there is no opening)."""
    from .objectives import _context_kv, _prompt_head

    template = compressor.config.prompt
    opening = _prompt_head(compressor.tokenizer, template.prefix + template.context_prefix)
    with torch.no_grad(), compressor.decoder_mode():
        return opening, _context_kv(compressor.base_model, opening, compressor.device) if opening else None


def _check_positions(compressor: SACCompressor, end: int) -> None:
    """Refuse to re-read chunks up to position ``end`` (exclusive: the opening, a chunk, the chunk
    again) where a dynamic RoPE model's frequencies would differ from the ones the chunk has."""
    limit = compressor.rotator.position_limit
    if limit is not None and end >= limit:
        raise InvalidInputError(
            f"refinement re-reads each chunk after the prompt's opening and the chunk itself, up to position "
            f"{end - 1}, but {compressor.rotator.model_kind} uses dynamic RoPE, whose frequencies are the base ones "
            f"only before its max_position_embeddings={limit}: compress chunks of fewer tokens (chunk_len) or turn "
            "refinement off (refine_steps=0)")


def _rereading_losses(compressor: SACCompressor, head, keys, values, placed: list[AnchorKV],
                      chunks: list[list[int]]) -> torch.Tensor:
    """Each chunk's re-reading loss (see ``rereading_loss``) from ``keys`` / ``values``, the K/V of
    the chunks ``placed`` after the opening ``head``."""
    from .objectives import _decode_rows

    dtype = compressor.dtype
    caches = [(_with_head(head, 0, k.to(dtype)), _with_head(head, 1, v.to(dtype))) for k, v in zip(keys, values)]
    rows = [(chunk[:1], list(chunk[1:])) for chunk in chunks]
    with compressor.decoder_mode():
        decoded = _decode_rows(compressor.base_model, caches, [kv.offset + kv.n_tokens for kv in placed], rows,
                               list(range(len(rows))))
    token_loss = F.cross_entropy(decoded.logits.float(), decoded.labels, reduction="none")
    summed = torch.zeros(len(rows), device=token_loss.device).index_add(0, decoded.row, token_loss)
    return summed / torch.as_tensor([len(target) for _, target in rows], device=token_loss.device)


def _with_head(head, part: int, tensor: torch.Tensor) -> torch.Tensor:
    """The prompt opening's keys (``part`` 0) or values (1) before ``tensor``, along the positions."""
    return tensor if head is None else torch.cat([head[part], tensor], dim=2)
