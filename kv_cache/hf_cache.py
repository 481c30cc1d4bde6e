"""`KVCache`: a Hugging Face `transformers` `Cache` backed by our paged `KVStore`.

    model.generate(input_ids, past_key_values=KVCache(KVCacheConfig(), model.config))

One `PagedLayer` per decoder layer (the contract of `transformers.Cache`, 5.17+); all layers share one store, in
which batch row `i` is sequence `seq_ids[i]`. `update` writes the new tokens into the row's blocks and returns
the row's keys/values gathered from the blocks, so stock `sdpa`/`eager` attention works unchanged. A prompt with
nothing cached before it gets its own states back, exactly (KIVI's prefill, as `hf_attention` does): the blocks'
format (quantized, lower precision) changes what later tokens read, not the prompt's own attention. Sliding-window
layers and low-rank storage read the blocks for the prompt too, as the paged attention does. Batch-wide
operations (`reorder_cache` for beam search, `crop`, `batch_select_indices`, `batch_repeat_interleave`, `reset`)
act once on the store: a beam that continues another shares its blocks (copy-on-write), nothing is copied.
Sliding-window layers keep their whole history; the model's sliding mask hides what is outside the window.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin

from kv_cache.config import KVCacheConfig
from kv_cache.errors import CacheError, CacheValidationError
from kv_cache.hf_attention import ATTENTION_NAME, hand_off
from kv_cache.kv_store import KVStore
from kv_cache.low_rank import LowRankProjection
from kv_cache.profiler import Profiler
from kv_cache.stats import CacheStatsTracker, build_stats, store_gauges
from kv_cache.token_eviction import TokenEvictor

if TYPE_CHECKING:
    from kv_cache.decode_graphs import StaticStep

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def attention_layer_types(model_config: PretrainedConfig) -> list[str]:
    """The decoder's layer types (`full_attention`, `sliding_attention`, ...), from the model's config."""
    text = model_config.get_text_config(decoder=True)
    layer_types = getattr(text, "layer_types", None)
    if layer_types is None:
        if getattr(text, "sliding_window", None) is not None:
            layer_types = ["sliding_attention"] * text.num_hidden_layers
        else:
            layer_types = ["full_attention"] * text.num_hidden_layers
    unsupported = sorted({t for t in layer_types if t not in SUPPORTED_LAYER_TYPES})
    if unsupported:
        raise CacheValidationError(
            f"model layer types {unsupported} are not supported by KVCache; supported: {list(SUPPORTED_LAYER_TYPES)} "
            "(linear-attention, recurrent and KV-sharing layers keep no per-token K/V we can page)"
        )
    return list(layer_types)


class PagedLayer(CacheLayerMixin):
    """One decoder layer's view of the shared store (what `transformers` calls a cache layer)."""

    is_compileable = False
    is_croppable = True

    def __init__(self, cache: KVCache, layer_idx: int, is_sliding: bool) -> None:
        super().__init__()
        self._cache = cache
        self.layer_idx = layer_idx
        self.is_sliding = is_sliding

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        cache = self._cache
        if cache.seq_ids is None:
            cache.seq_ids = [cache.store.add_sequence() for _ in range(key_states.shape[0])]
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `[batch, kv_heads, new_tokens, head_dim]` states; return all of this layer's keys and values."""
        cache = self._cache
        if not self.is_initialized or cache.seq_ids is None:
            cache.check_eviction_support()
            self.lazy_initialization(key_states, value_states)
        assert cache.seq_ids is not None
        if cache.graph_step is not None:  # a static decode step (decode_graphs): the slots are reserved
            cache.graph_step.write(self.layer_idx, key_states, value_states)
            hand_off(cache, self.layer_idx)
            return key_states, value_states
        with cache.profiler.record("update", key_states.device):
            paged = cache.reads_paged
            if cache.evictor is not None and not paged:  # the paged attention evicts after it has attended
                cache.evictor.evict(cache.seq_ids, self.layer_idx, incoming=key_states.shape[2])
            cached = cache.store.num_tokens(cache.seq_ids[0], self.layer_idx)
            fresh = (  # a decode step stops at `cached`
                cached == 0
                and not self.is_sliding
                and cache.low_rank is None
                and not any(cache.store.num_tokens(seq_id, self.layer_idx) for seq_id in cache.seq_ids)
            )
            stored = key_states, value_states
            if cache.low_rank is not None:  # the blocks hold coefficients on the layer's bases
                stored = cache.low_rank.compress(self.layer_idx, *stored)
            cache.store.append(cache.seq_ids, self.layer_idx, *stored, seal=not cache.seal_after_step)
            if paged:  # the attention function reads the blocks itself
                hand_off(cache, self.layer_idx)
            if paged or fresh:  # (a fresh prompt attends its own exact states)
                keys, values = key_states, value_states
            else:
                keys, values = cache.read_states(self.layer_idx, key_states.dtype)
        new = key_states.shape[2]
        cache.tracker.record_read(cached * len(cache.seq_ids), new * len(cache.seq_ids))
        if self.layer_idx == cache.num_layers - 1:
            cache.tracker.snapshot(functools.partial(store_gauges, cache.store))
        return keys, values

    def get_seq_length(self) -> int:
        """Tokens seen (evicted ones included): the next token's position."""
        seq_ids = self._cache.seq_ids
        return 0 if not seq_ids else self._cache.store.num_seen(seq_ids[0], self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Key columns attention will see: the tokens held (fewer than seen after eviction) plus the new ones."""
        seq_ids = self._cache.seq_ids
        held = 0 if not seq_ids else self._cache.store.num_tokens(seq_ids[0], self.layer_idx)
        return held + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        seq_ids = self._cache.seq_ids
        return -1 if seq_ids is None else len(seq_ids)

    def reset(self) -> None:
        self.is_initialized = False

    def _batch_wide(self, *args: Any, **kwargs: Any) -> None:
        raise CacheError("paged layers share one store: call this method on the KVCache, not on one layer")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = offload = prefetch = _batch_wide


class KVCache(Cache):
    """A `transformers.Cache` whose keys and values live in the blocks of a paged `KVStore`.

    Args:
        config: the cache configuration (block size, pool size, dtype, ...). Default: `KVCacheConfig()`.
        model_config: the model's `PretrainedConfig`; its decoder layer types decide the layers.
        store: an existing store to view (an engine's pool, shared by many caches); `config` is then the store's.
            Set `seq_ids` to choose which of its sequences are the batch rows.
    """

    def __init__(
        self,
        config: KVCacheConfig | None = None,
        model_config: PretrainedConfig | None = None,
        store: KVStore | None = None,
    ) -> None:
        if model_config is None:
            raise CacheValidationError("model_config is required: pass model.config so the cache knows the layers")
        self.config = store.config if store is not None else (config or KVCacheConfig())
        self.model_config = model_config
        layer_types = attention_layer_types(model_config)
        self.num_layers = len(layer_types)
        if store is not None and store.num_layers != self.num_layers:
            raise CacheValidationError(f"store has {store.num_layers} layers; the model has {self.num_layers}")
        self.store = store or KVStore(self.config, self.num_layers)
        self.evictor = None
        self.tracker = CacheStatsTracker(self.config.history_size, self.config.snapshot_interval_s)
        self.profiler = Profiler(self.config.enable_profiling)
        self.evictor = TokenEvictor(self.config, self.store, self.tracker) if self.config.evicts_tokens else None
        compressor = self.config.compressor
        self.low_rank = LowRankProjection(compressor, self.num_layers) if compressor is not None else None
        self.seq_ids: list[int] | None = None
        # True while a forward's appends leave every token in full precision, to be sealed by the caller after the
        # step, all layers at once (`KVStore.append(..., seal=False)`; the engine's long prefill chunks)
        self.seal_after_step = False
        # decode_graphs: the static step being run or captured, the graphs by key, their memory pool, the rows checked
        # unpadded
        self.graph_step: StaticStep | None = None
        self.decode_graphs: dict[tuple, Any] = {}
        self.graph_pool: Any = None  # the memory pool the graphs share (a CUDA graph pool handle)
        self.unpadded_rows: tuple[int, ...] | None = None
        layers = [PagedLayer(self, i, t != "full_attention") for i, t in enumerate(layer_types)]
        for layer in layers:
            # Cutting into sealed blocks dequantizes them: crop cannot restore the exact earlier state.
            layer.is_croppable = not self.config.use_quantization
        super().__init__(layers=layers)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new states of `layer_idx` and return what its attention reads (see `PagedLayer.update`)."""
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < len(self.layers):
            raise CacheValidationError(
                f"layer_idx={layer_idx!r} is out of range; the model has {len(self.layers)} layers"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    # Batch-wide operations act once on the store (the layers share its block tables).
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row `i` continues the beam `beam_idx[i]` (blocks shared, copied only when written)."""
        self._replace_rows([int(i) for i in beam_idx.tolist()])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._replace_rows([int(i) for i in torch.as_tensor(indices).tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise CacheValidationError(f"repeats={repeats!r} must be an int >= 1")
        if self.seq_ids is not None:
            self._replace_rows([row for row in range(len(self.seq_ids)) for _ in range(repeats)])

    def crop(self, tokens_to_remove: int) -> None:
        """`crop(-n)` drops the newest `n` tokens; a positive value is the legacy absolute length (5.17 callers)."""
        if not self.seq_ids or tokens_to_remove == 0:
            return
        length = self.store.num_tokens(self.seq_ids[0])
        keep = length + tokens_to_remove if tokens_to_remove < 0 else min(tokens_to_remove, length)
        for seq_id in self.seq_ids:
            self.store.truncate(seq_id, max(keep, 0))

    def read_states(self, layer_idx: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached key and value of `layer_idx`, `[batch, kv_heads, tokens, head_dim]` (expanded from the
        coefficients with low-rank storage, in `dtype`)."""
        keys, values = self.store.read(self.seq_ids or [], layer_idx)
        if self.low_rank is not None:
            return self.low_rank.expand(layer_idx, keys, values, dtype)
        return keys, values

    def reset(self) -> None:
        self.store.reset()
        self.seq_ids = None
        for layer in self.layers:
            layer.reset()

    def check_eviction_support(self) -> None:
        """Raise `CacheValidationError` if the configured token eviction needs what the model's attention lacks."""
        if self.evictor is not None and self.evictor.needs_attention_mass and not self.reads_paged:
            raise CacheValidationError(
                f"cache_strategy={self.config.cache_strategy.name} token eviction ranks tokens by the attention they "
                "receive, which only kv_cache's attention reports: model.set_attn_implementation(register_attention())"
                ", or use CacheStrategy.LRU (a sliding window)"
            )

    @property
    def reads_paged(self) -> bool:
        """Whether the model attends with `hf_attention.paged_attention` (then `update` returns no dense copy)."""
        return getattr(self.model_config, "_attn_implementation", None) == ATTENTION_NAME

    def get_stats(self, include_history: bool = False, include_quantization_error: bool = False) -> dict[str, Any]:
        """Tokens, blocks used/free, memory (MiB), hit rate, profiling and, if asked, the history; with low-rank
        storage also `low_rank` (rank, head_dim, the bases' MiB)."""
        stats = build_stats(self.store, self.tracker, self.profiler, include_history, include_quantization_error)
        if self.low_rank is not None:
            stats["low_rank"] = self.low_rank.stats()
        return stats

    def _replace_rows(self, sources: list[int]) -> None:
        """Make batch row `i` a copy of old row `sources[i]` (sharing blocks), then drop the old rows."""
        if self.seq_ids is not None:
            self.seq_ids = self.store.replace_rows(self.seq_ids, sources)
