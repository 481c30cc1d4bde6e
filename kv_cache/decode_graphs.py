"""Decode steps of a Hugging Face model over a `KVCache`, captured once in a CUDA graph and replayed.

    name = register_attention()
    model.set_attn_implementation(name)
    with decode_graphs(model):
        out = model.generate(ids, past_key_values=KVCache(config, model.config), max_new_tokens=128)

An eager decode step spends most of its time launching kernels from Python: per layer the cache's bookkeeping,
the attention launch and Hugging Face's layer code (~17 ms of host time per step for a 16-layer 1B model, far
above the GPU time). Inside `decode_graphs(model)` a one-token step over a `KVCache` runs in three parts:

1. the host plans: `KVStore.reserve` allocates blocks and seals what leaves the full-precision window (eagerly,
   between steps), and the new token ids, positions, slots, block tables and lengths go into fixed device buffers
   (`StaticStep`, one non-blocking copy; the tables only when a block list changed);
2. the graph runs the whole forward: every layer writes its new keys/values into the reserved slots and attends
   over the static block tables with `kv_cache.attention` (the launch reads no data on the host);
3. the logits are copied out of the graph's output.

The first step of a batch size runs eagerly (it is also the warm-up) and is then captured; later steps replay.
One graph per (cache, batch size, `logits_to_keep`), kept on the cache and freed with it. The block tables are
sized for `max_tokens` (`residual_tokens` for the tail of a quantized cache), so one graph serves every length.

Other calls run the model's own forward unchanged: prefill, a batch with left padding (the 2-D mask has zeros;
checked once per batch of sequences), inputs_embeds, outputs the graph does not return (attentions, hidden
states), caches with token eviction or low-rank storage, and models not using `register_attention()`. Positions
follow the cache (tokens seen), as they do in `generate` without padding. On a CPU there is nothing to capture:
the same static step runs eagerly, which is how the tests check it against the eager path; so does a CUDA cache
whose shapes the Triton kernels do not tile (the torch reference reads lengths on the host). A forward that
cannot be captured (an op that syncs) warns once and stays eager.

`KVCacheEngine` runs its decode batches and its prefill chunks through the same `StepGraph` (several tokens per
row, padded to a fixed width: see `StepGraph`), with `EngineConfig.decode_graphs`.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from kv_cache import attention
from kv_cache.attention.paged_kv import PagedKV, QuantizedKV
from kv_cache.block_io import token_rows
from kv_cache.block_table import blocks_needed
from kv_cache.errors import CacheError, CacheValidationError
from kv_cache.hf_cache import KVCache
from kv_cache.kv_store import KVStore, ReservedStep
from kv_cache.stats import store_gauges

# Keyword arguments a decode step may carry into the graph (the values that matter are checked in `_runner`).
GRAPH_KWARGS = frozenset(
    {
        "input_ids",
        "attention_mask",
        "position_ids",
        "cache_position",
        "past_key_values",
        "use_cache",
        "logits_to_keep",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
        "inputs_embeds",
    }
)


class StaticStep:
    """The fixed device buffers a captured model step of `batch` rows x `tokens` new tokens reads, and its two
    jobs inside the forward: `write` a layer's new keys/values into the reserved slots, `paged_kv` the layer for
    attention.

    Buffers: ids `[batch, tokens]` int64; `meta` int64 = the index of the kept logits `[1]`, positions
    `[batch, tokens]`, slots `[batch * tokens]`, then what the kernels read as int32 (`tables32`, converted inside
    the graph): tail lengths `[batch]`, sealed lengths `[batch]`, the full-precision block table
    `[batch, dense_width]` and the sealed one `[batch, sealed_width]`.
    """

    def __init__(self, store: KVStore, batch: int, tokens: int = 1) -> None:
        pool = store.pool
        if pool is None:
            raise CacheValidationError("a step graph follows a first append: the cache holds no tokens yet")
        config, size = store.config, store.block_size
        self.store, self.batch, self.tokens, self.device = store, batch, tokens, pool.device
        self.quantized = store.quantized_pool is not None
        if self.quantized:  # the tail: < residual_tokens + block_size tokens from a block boundary, + padding
            self.dense_width = (config.residual_tokens + tokens - 1) // size + 2
            self.sealed_width = blocks_needed(config.max_tokens, size)
        else:
            self.dense_width, self.sealed_width = blocks_needed(config.max_tokens, size), 0
        per_step = batch * tokens
        self.head = 1 + 2 * per_step + 2 * batch  # copied every step; the tables only when they change
        tables = batch * (self.dense_width + self.sealed_width)
        self.ids = torch.zeros((batch, tokens), dtype=torch.long, device=self.device)
        self.meta = torch.zeros(self.head + tables, dtype=torch.long, device=self.device)
        self.tables32 = torch.zeros(2 * batch + tables, dtype=torch.int32, device=self.device)
        self.keep_index = self.meta[:1]
        self.positions = self.meta[1 : 1 + per_step].view(batch, tokens)
        self.cache_position = self.meta[1 : 1 + tokens]
        self.slots = self.meta[1 + per_step : 1 + 2 * per_step]
        self._tables_of: tuple[int, tuple[int, ...]] | None = None  # (store version, rows) of the tables in `meta`
        self._views: dict[int, PagedKV] = {}

    def load(self, step: ReservedStep, seq_ids: tuple[int, ...], input_ids: torch.Tensor) -> None:
        """Copy a step reserved for `tokens` tokens per row of `seq_ids` into the buffers: ids `[rows, n]`
        (device to device; n <= tokens), the kept-logits index n - 1, positions, slots and lengths, and the block
        tables when the step carries them (the rows or the store's version changed since `held_version`); one
        non-blocking copy from page-locked memory.

        Tokens past `n` repeat the row's last token at the next positions (their keys/values land past the real
        end, and a real query never sees them: its causal limit is set by the lengths); rows past `rows` up to
        `batch` repeat the last row (the same tokens into the same slots). Their outputs are dropped.
        """
        rows, batch, tokens, count = step.rows, self.batch, self.tokens, len(seq_ids)
        with_tables = rows.dense_rows is not None
        length = self.head + (self.meta.shape[0] - self.head if with_tables else 0)
        staging = torch.empty(length, dtype=torch.long, pin_memory=self.device.type == "cuda")
        values = staging.numpy()
        values[0] = input_ids.shape[1] - 1
        per_step = batch * tokens
        positions = values[1 : 1 + per_step].reshape(batch, tokens)
        positions[:count] = np.add.outer(step.positions, np.arange(tokens))
        positions[count:] = positions[count - 1]
        slots = values[1 + per_step : 1 + 2 * per_step].reshape(batch, tokens)
        slots[:count] = np.asarray(step.slots).reshape(count, tokens)
        slots[count:] = slots[count - 1]
        sealed_lens = rows.sealed_lens if rows.sealed_lens is not None else [0] * count
        for offset, column in ((1 + 2 * per_step, rows.tail_lens), (1 + 2 * per_step + batch, sealed_lens)):
            values[offset : offset + count] = column
            values[offset + count : offset + batch] = column[-1]
        if rows.dense_rows is not None:  # (with_tables, spelled so that mypy narrows it)
            self._fill(values[self.head :], rows.dense_rows, self.dense_width, "full-precision")
            if rows.sealed_rows is not None:
                sealed = values[self.head + batch * self.dense_width :]
                self._fill(sealed, rows.sealed_rows, self.sealed_width, "sealed")
            self._tables_of = (step.version, seq_ids)
        self.meta[:length].copy_(staging, non_blocking=True)
        new = input_ids.shape[1]
        self.ids[:count, :new].copy_(input_ids)
        if new < tokens:
            self.ids[:count, new:].copy_(input_ids[:, -1:].expand(count, tokens - new))
        if count < batch:
            self.ids[count:].copy_(self.ids[count - 1 : count].expand(batch - count, tokens))

    def held_version(self, seq_ids: tuple[int, ...]) -> int | None:
        """The store version of the block tables in the buffers, if they are those of `seq_ids` (for `reserve`)."""
        held = self._tables_of
        return held[0] if held is not None and held[1] == seq_ids else None

    def _fill(self, values: np.ndarray, rows: list[list[int]], width: int, what: str) -> None:
        """Rows of block ids, each from `index * width`, the last one repeated up to `batch`."""
        for index in range(self.batch):
            row = rows[min(index, len(rows) - 1)]
            if len(row) > width:
                raise CacheError(f"a sequence spans {len(row)} {what} blocks; the step graph's table holds {width}")
            values[index * width : index * width + len(row)] = row

    def convert(self) -> None:
        """The kernels' int32 lengths and tables from `meta` (a device op: it is part of the graph)."""
        self.tables32.copy_(self.meta[1 + 2 * self.batch * self.tokens :])

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store `layer`'s new states `[batch, kv_heads, tokens, head_dim]` into the reserved slots."""
        pool = self.store.pool
        assert pool is not None
        dense = pool.dense(layer)
        dtype = dense.keys.dtype
        dense.write(self.slots, token_rows(key, dtype), token_rows(value, dtype))

    def paged_kv(self, layer: int) -> PagedKV:
        """`layer` over the static tables (the same tensors at every step)."""
        view = self._views.get(layer)
        if view is None:
            view = self._views[layer] = self._view(layer)
        return view

    def _view(self, layer: int) -> PagedKV:
        pool, batch = self.store.pool, self.batch
        assert pool is not None
        tail_lens, sealed_lens = self.tables32[:batch], self.tables32[batch : 2 * batch]
        dense_end = 2 * batch + batch * self.dense_width
        dense_table = self.tables32[2 * batch : dense_end].view(batch, self.dense_width)
        quantized = None
        if self.quantized and self.store.quantized_pool is not None:
            storage = self.store.quantized_pool.quantized(layer)
            sealed_table = self.tables32[dense_end:].view(batch, self.sealed_width)
            quantized = QuantizedKV(
                storage.key_codes, storage.key_scale, storage.key_zero,
                storage.value_codes, storage.value_scale, storage.value_zero,
                sealed_table, sealed_lens,
            )  # fmt: skip
        dense = pool.dense(layer)
        return PagedKV(dense.keys, dense.values, dense_table, tail_lens, quantized)


class StepGraph:
    """Model steps of `forward` over `cache` adding up to `tokens` tokens to each of up to `batch` sequences:
    eager the first time, then a replay of the CUDA graph captured after it (or always the eager static step
    where nothing can be captured).

    forward: the model's call (`input_ids`, `position_ids`, `past_key_values`, `logits_to_keep`, ...);
    options: `logits_to_keep` (0 or 1, for one token; with more tokens the logits of each row's last real token
    are kept) and `cache_position` (whether `forward` takes one). A step of fewer tokens than `tokens` is padded:
    the padding is written past the sequence's end and cut off after the step; sealing follows the real tokens,
    before the step for up to `residual_tokens` of them (as `append` seals), after it for more (the chunk is
    written in full precision first, and attends to itself so: KIVI's prefill; `append` would seal part of it
    before attention).
    """

    def __init__(
        self, forward: Callable[..., Any], cache: KVCache, batch: int, options: dict[str, Any], tokens: int = 1
    ) -> None:
        assert cache.store.pool is not None
        self.forward, self.cache, self.options = forward, cache, options
        self.static = StaticStep(cache.store, batch, tokens)
        self.capture = _capturable(self.static)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: Any = None

    def __call__(self, input_ids: torch.Tensor) -> Any:
        """The model output of one step: `input_ids` `[rows, n]` appended to `cache.seq_ids` (rows <= batch,
        n <= tokens); its logits are a copy, `[rows, 1, vocab]` (or every token's with one token and
        `logits_to_keep=0`). Raises `CacheMemoryError`, with nothing changed, when the padded step does not fit."""
        cache, static = self.cache, self.static
        assert cache.seq_ids is not None
        seq_ids = tuple(cache.seq_ids)
        rows, new = input_ids.shape
        if not 0 < len(seq_ids) == rows <= static.batch or not 0 < new <= static.tokens:
            raise CacheValidationError(
                f"input_ids {list(input_ids.shape)} must be [rows, n] for the cache's {len(seq_ids)} rows, with rows "
                f"<= {static.batch} and n <= {static.tokens}"
            )
        # A quantized chunk longer than the window seals after the step (its tokens must be written first).
        seal_after = static.quantized and new > cache.config.residual_tokens
        held = static.held_version(seq_ids)
        step = cache.store.reserve(seq_ids, static.tokens, real=new, seal_after=seal_after, held_version=held)
        static.load(step, seq_ids, input_ids)
        if self.graph is not None:
            self.graph.replay()
            output = self.output
        else:
            output = self._run()
            if self.capture:
                self._capture()
        if new < static.tokens:  # cut the padding off (its blocks go back to the pool)
            for seq_id, first in zip(seq_ids, step.positions, strict=True):
                cache.store.truncate(seq_id, first + new)
        if seal_after:
            cache.store.seal(seq_ids)
        layers = cache.num_layers
        cache.tracker.record_read(sum(step.positions) * layers, rows * new * layers)
        cache.tracker.snapshot(functools.partial(store_gauges, cache.store))
        return type(output)(logits=output.logits[:rows].clone(), past_key_values=cache)

    def _run(self) -> Any:
        """The forward over the static buffers (what the graph holds)."""
        static, cache = self.static, self.cache
        static.convert()
        cache.graph_step = static
        try:
            extra = {"cache_position": static.cache_position} if self.options["cache_position"] else {}
            keep = self.options["logits_to_keep"] if static.tokens == 1 else static.keep_index
            return self.forward(
                input_ids=static.ids, position_ids=static.positions, past_key_values=cache, use_cache=True,
                return_dict=True, logits_to_keep=keep, **extra,
            )  # fmt: skip
        finally:
            cache.graph_step = None

    def _capture(self) -> None:
        """Capture `_run` into a graph. The graphs of one cache share one memory pool (they never run at once, and
        each keeps only its output alive); other threads may use the device meanwhile (an engine's tier copies)."""
        graph = torch.cuda.CUDAGraph()
        cache = self.cache
        if cache.graph_pool is None:
            cache.graph_pool = torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=cache.graph_pool, capture_error_mode="thread_local"):
                self.output = self._run()
        except RuntimeError as error:  # an op that syncs or reads data on the host: stay eager, say why once
            self.capture = False
            # A capture that fails can leave its pool marked as recording in the allocator ("already recording to
            # mempool_id" at the next capture into it): the cache's later graphs take a fresh pool.
            cache.graph_pool = None
            warnings.warn(f"decode_graphs: capturing the decode step failed ({error}); it runs eagerly", stacklevel=3)
            return
        self.graph = graph


@contextmanager
def decode_graphs(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, `model`'s one-token decode steps over a `KVCache` replay CUDA graphs (module docstring).

    The model must attend with `register_attention()`'s implementation. Restores the model's forward on exit.
    """
    if not isinstance(model, torch.nn.Module):
        raise CacheValidationError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    own = model.__dict__.get("forward")  # an instance-level forward already set (accelerate hooks) or None
    original = model.forward
    accepts = inspect.signature(original).parameters

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        runner = None if args else _runner(model, original, "cache_position" in accepts, kwargs)
        return original(*args, **kwargs) if runner is None else runner(kwargs["input_ids"])

    model.forward = forward
    try:
        yield model
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


def _runner(model: torch.nn.Module, forward: Callable[..., Any], cache_position: bool, kwargs: dict) -> Any:
    """The `StepGraph` that runs this call, or None when it must run eagerly (module docstring)."""
    cache, ids = kwargs.get("past_key_values"), kwargs.get("input_ids")
    if not isinstance(cache, KVCache) or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != 1:
        return None
    keep = kwargs.get("logits_to_keep", 0)
    if (
        not GRAPH_KWARGS.issuperset(kwargs)
        or kwargs.get("inputs_embeds") is not None
        or kwargs.get("output_attentions")
        or kwargs.get("output_hidden_states")
        or kwargs.get("use_cache") is False
        or kwargs.get("return_dict") is False
        or isinstance(keep, bool)
        or keep not in (0, 1)
        or not graphable(cache, ids.shape[0])
    ):
        return None
    mask = kwargs.get("attention_mask")
    if mask is not None:  # a batch with left padding runs eagerly (the paged path masks it densely)
        rows = tuple(cache.seq_ids or ())
        if mask.dim() != 2:
            return None
        if cache.unpadded_rows != rows:  # checked once per batch of sequences: generate only appends ones
            if not bool(mask.all()):
                return None
            cache.unpadded_rows = rows
    pool = cache.store.pool
    assert pool is not None
    key = (id(model), ids.shape[0], keep, pool.dense(0).keys.data_ptr())
    runner = cache.decode_graphs.get(key)
    if runner is None:
        options = {"logits_to_keep": keep, "cache_position": cache_position}
        runner = cache.decode_graphs[key] = StepGraph(forward, cache, ids.shape[0], options)
    return runner


def padded_size(size: int, limit: int) -> int:
    """The graph size for `size` rows or tokens when they vary (an engine's running set, its prefill chunks): the
    next power of two, at most `limit` (and at least `size`), so a handful of graphs serve every size."""
    return max(size, min(limit, 1 << (size - 1).bit_length()))


def graphable(cache: KVCache, rows: int) -> bool:
    """Whether the cache's next step of `rows` sequences can run as a static step: paged attention
    (`register_attention()`), no token eviction, no low-rank storage, and a full-precision window of >= 1 token
    when quantized (sealing before a one-token step then never needs the token being written)."""
    store = cache.store
    return (
        cache.reads_paged
        and cache.evictor is None
        and cache.low_rank is None
        and cache.seq_ids is not None
        and len(cache.seq_ids) == rows
        and store.pool is not None
        and (store.sealer is None or cache.config.residual_tokens >= 1)
    )


def _capturable(static: StaticStep) -> bool:
    """Whether the step can be captured: on CUDA, with the Triton kernels (the reference reads lengths on the host,
    so shapes the kernels do not tile run the static step eagerly)."""
    device = static.device
    if device.type != "cuda":
        return False
    probe = torch.empty(0, device=device)
    return attention.select_backend(probe, static.paged_kv(0)) is not attention.reference
