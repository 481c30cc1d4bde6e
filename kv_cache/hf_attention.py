"""Attention over the paged store inside Hugging Face models: an `AttentionInterface` implementation.

    name = register_attention()                       # explicit: importing kv_cache registers nothing
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)   # or model.set_attn_implementation
    model.generate(ids, past_key_values=KVCache(config, model.config))

With this implementation `KVCache.update` only stores the new keys/values (no dense copy of the cache) and the
attention function reads the blocks in their stored format through `kv_cache.attention` (Triton on CUDA, the
torch reference elsewhere). Transformers does not pass the cache to attention functions, so `update` hands the
layer over in a context variable that the attention function of the same layer consumes right after.

A left-padded batch (a 2-D mask with zeros) falls back to the cache's dense read and SDPA with that mask:
correct, but without the paged kernels. A prompt with nothing cached before it is attended by SDPA over its own
states, exactly as the model computed them, whatever format stores them (KIVI's prefill; Hugging Face's
`QuantizedCache` and kvpress, which compresses after the prefill, do the same): quantization and lower-precision
blocks change what later tokens read, not the prompt's own attention, and SDPA's flash kernel beats the paged
kernels at long prompts. Causality, sliding windows and GQA are otherwise the kernels' job.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from kv_cache import attention
from kv_cache.errors import CacheError

if TYPE_CHECKING:
    from kv_cache.hf_cache import KVCache

ATTENTION_NAME = "kv_cache_paged"


@dataclass(frozen=True)
class LayerHandoff:
    """What `KVCache.update` leaves for the attention function of the same layer."""

    cache: KVCache
    layer_idx: int


_HANDOFF: ContextVar[LayerHandoff | None] = ContextVar("kv_cache_layer_handoff", default=None)


def register_attention(name: str = ATTENTION_NAME) -> str:
    """Register the paged attention (and its mask function) with transformers under `name`; returns `name`."""
    AttentionInterface.register(name, paged_attention)
    AttentionMaskInterface.register(name, padding_mask)
    return name


def hand_off(cache: KVCache, layer_idx: int) -> None:
    """Called by `KVCache.update`: the next attention call of `layer_idx` reads this cache."""
    _HANDOFF.set(LayerHandoff(cache, layer_idx))


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The 2-D padding mask `[batch, kv_length]` bool, or None when no token is padded (the kernels' fast path)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    window = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
    return None if bool(window.all()) else window


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of `query` `[batch, q_heads, q_len, head_dim]` over the paged cache of `module`'s layer.

    `key`/`value` are the new tokens only (already stored); returns `[batch, q_len, q_heads, head_dim]`.
    """
    handoff = _HANDOFF.get()
    layer_idx = getattr(module, "layer_idx", None)
    if handoff is None or handoff.layer_idx != layer_idx:
        raise CacheError(
            f"attn_implementation={ATTENTION_NAME!r} reads a kv_cache KVCache: pass "
            f"past_key_values=KVCache(config, model.config) (layer handoff missing for layer {layer_idx})"
        )
    _HANDOFF.set(None)
    cache = handoff.cache
    window = kwargs.get("sliding_window")
    static = cache.graph_step
    if static is not None:  # a decode step over fixed buffers (decode_graphs): nothing read on the host
        out = attention.prefill(query, static.paged_kv(handoff.layer_idx), scale=scaling, sliding_window=window)
        return out.transpose(1, 2), None
    if attention_mask is not None:
        return _dense_fallback(cache, handoff.layer_idx, query, attention_mask, (scaling, window)), None
    seq_ids, layer = cache.seq_ids or [], handoff.layer_idx
    kv = cache.store.paged_kv(seq_ids, layer)
    if cache.low_rank is not None:  # attend in coefficient space (see low_rank.LowRankProjection)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        query = cache.low_rank.project_query(layer, query)
    evictor = cache.evictor
    wants_mass = evictor is not None and evictor.needs_attention_mass
    q_len = query.shape[2]
    # A decode step is prefill of q_len 1 (the same launch as `decode`), which takes HF's layout without a reshape.
    mass = None
    if _fresh_prompt(cache, seq_ids, layer, query, window):  # the new states are the whole cache
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    elif wants_mass and q_len == 1:
        out, mass = attention.prefill(query, kv, scale=scaling, sliding_window=window, return_attention_mass=True)
    else:
        out = attention.prefill(query, kv, scale=scaling, sliding_window=window)
    if wants_mass and q_len > 1:  # SnapKV: score the prompt by its last `observation_window` queries
        observed = query[:, :, -cache.config.observation_window :]
        _, mass = attention.prefill(observed, kv, scale=scaling, sliding_window=window, return_attention_mass=True)
    if evictor is not None:
        if mass is not None:
            evictor.observe(seq_ids, layer, mass, min(q_len, cache.config.observation_window))
        evictor.evict(seq_ids, layer)
    if cache.low_rank is not None:
        out = cache.low_rank.expand_output(layer, out)
    return out.transpose(1, 2), None


def _fresh_prompt(cache: KVCache, seq_ids: list[int], layer: int, query: torch.Tensor, window: int | None) -> bool:
    """Whether every row holds just this call's tokens (a prompt with nothing cached before it), without a sliding
    window or low-rank storage (those attend what the blocks hold): the prompt then attends its own exact states,
    causally, by SDPA (flash attention on CUDA). Reads only host-side lengths."""
    store, q_len = cache.store, query.shape[2]
    return (
        q_len > 1
        and window is None
        and cache.low_rank is None
        and all(store.num_tokens(seq_id, layer) == q_len for seq_id in seq_ids)
    )


def _dense_fallback(
    cache: KVCache,
    layer_idx: int,
    query: torch.Tensor,
    padding: torch.Tensor,
    options: tuple[float | None, int | None],
) -> torch.Tensor:
    """SDPA over the dense read with the padding mask, causality and the sliding window folded in."""
    scaling, window = options
    keys, values = cache.read_states(layer_idx, query.dtype)
    q_len, kv_len = query.shape[2], keys.shape[2]
    rows = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
    cols = torch.arange(kv_len, device=query.device)[None, :]
    visible = cols <= rows
    if window is not None:
        visible = visible & (cols > rows - window)
    mask = visible[None, None] & padding[:, None, None, :]
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2)
