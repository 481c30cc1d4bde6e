"""`KVCacheEngine`: many requests over one block pool, for a Hugging Face causal LM.

    engine = KVCacheEngine(model, KVCacheConfig(num_blocks=512), EngineConfig(max_num_seqs=16))
    outputs = engine.generate([prompt_a, prompt_b], SamplingParams(max_new_tokens=32))   # token lists
    request_id = engine.add_request(prompt_c)          # or drive it yourself:
    for token in engine.stream(request_id): ...        # steps the engine until the request is done

Each `step()` runs one forward for every decoding request at once (rows at their own lengths; explicit
`position_ids`, no attention mask) plus one forward per scheduled prefill chunk, samples a token for each request
whose pending tokens are all computed, hands newly written full blocks to the prefix cache, and frees finished
requests' blocks at once. The model attends through `kv_cache.hf_attention`'s paged implementation, reading the
blocks directly: **the constructor registers it and switches the model to it** (`register_attention()` then
`model.set_attn_implementation(...)`); switch back with `model.set_attn_implementation("sdpa")` when done.

Threads: `add_request` may be called from any thread while another steps; `step`, `stream`, `abort` serialise on
the engine's lock; `get_stats` never waits for a step (it returns the last step's snapshot while one runs).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel

from kv_cache.config import KVCacheConfig
from kv_cache.engine.config import EngineConfig, InvariantCheck
from kv_cache.engine.invariants import check_engine
from kv_cache.engine.request import FinishReason, Request, RequestStatus, SamplingParams
from kv_cache.engine.scheduler import Scheduler
from kv_cache.errors import CacheError, CacheMemoryError, CacheValidationError
from kv_cache.hf_attention import register_attention
from kv_cache.hf_cache import KVCache, attention_layer_types
from kv_cache.kv_store import KVStore
from kv_cache.memory_manager import MemoryManager
from kv_cache.prefix_cache import PrefixCache, model_fingerprint, root_hash

if TYPE_CHECKING:
    from kv_cache.metrics import MetricsServer
from kv_cache.stats import CacheStatsTracker, store_gauges
from kv_cache.tiers.cpu import CpuTier, host_blocks_per_format

RETAINED_REQUESTS = 1024  # finished requests kept for `get_request`/`request_stats`/`stream`, the newest first


class KVCacheEngine:
    """Continuous batching with prefix caching, a CPU tier and preemption over one `KVStore`.

    Args:
        model: a Hugging Face causal LM (decoder layers of full or sliding attention), in eval mode.
        config: the cache: block size, pool size (`num_blocks` or `memory_budget_mb`; by default room for
            `max_num_seqs` sequences of `max_tokens`), dtype, quantization, and the prefix-cache eviction strategy.
        engine_config: scheduling, prefix caching, preemption and CPU tier settings (`EngineConfig()` if None).
    """

    def __init__(
        self, model: PreTrainedModel, config: KVCacheConfig, engine_config: EngineConfig | None = None
    ) -> None:
        self.model = model
        self.config = config
        self.engine_config = engine_config = engine_config or EngineConfig()
        parameter = next(model.parameters())
        self.device = parameter.device
        if config.device != "auto" and config.resolved_device() != self.device:
            raise CacheValidationError(f"device={config.device!r} but the model is on {self.device}; use 'auto'")
        if config.evicts_tokens:  # positions, prefix blocks and swap all assume every token stays in the store
            raise CacheValidationError(
                "token_budget / compression_ratio (token eviction) are not supported by KVCacheEngine yet; "
                "unset them, or use KVCache with model.generate"
            )
        model.set_attn_implementation(register_attention())
        self.store = _initialized_store(model, config, engine_config.max_num_seqs)
        self._cache = KVCache(model_config=model.config, store=self.store)
        self.tier = _make_tier(self.store, engine_config)
        self.prefix_cache = _make_prefix_cache(model, config, engine_config, self.store, self.tier)
        self.memory = MemoryManager(engine_config, self.device, self.store, self.prefix_cache, self.tier)
        self.tracker = CacheStatsTracker(config.history_size, config.snapshot_interval_s)
        self.scheduler = Scheduler(engine_config, self.memory, self.tracker)
        self._requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._snapshot: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------ API
    def add_request(self, prompt_ids: Sequence[int] | torch.Tensor, sampling: SamplingParams | None = None) -> int:
        """Queue a prompt (token ids, `[tokens]`); returns its request id. It joins the batch at the next step.

        A request that could never fit (longer than `max_tokens`, or than the whole pool) fails at once: its
        `stream` raises `CacheMemoryError` and `get_request(...).error` says what to change.
        """
        prompt = _token_list(prompt_ids)
        request_id = next(self._ids)
        request = Request(request_id, prompt, sampling or SamplingParams(), arrival=request_id)
        request.arrival_time = time.perf_counter()
        self._requests[request_id] = request
        total = len(prompt) + request.sampling.max_new_tokens
        if total > self.config.max_tokens:
            error = CacheMemoryError(
                f"request {request_id} may reach {total} tokens (prompt {len(prompt)} + max_new_tokens "
                f"{request.sampling.max_new_tokens}) but max_tokens={self.config.max_tokens}; raise max_tokens"
            )
            request.finish(RequestStatus.FAILED, FinishReason.ERROR, error)
        elif self.memory.never_fits(total):
            error = self.memory.capacity_error(request, self.memory.total_needs(total))
            request.finish(RequestStatus.FAILED, FinishReason.ERROR, error)
        else:
            self.scheduler.add(request)
        return request_id

    def step(self) -> list[tuple[int, int]]:
        """Run one scheduling step; returns `(request id, new token)` for every token generated in it."""
        with self._lock:
            outputs: list[tuple[int, int]] = []
            self.memory.run_with_oom_retry(lambda: self._step_once(outputs), self._rollback)
            self._after_step()
            return outputs

    def generate(
        self, prompts: Sequence[Sequence[int] | torch.Tensor], sampling: SamplingParams | None = None
    ) -> list[list[int]]:
        """Generate for every prompt (continuous batching); returns each prompt's new tokens, in order.

        Raises the first request's error if any failed (after every other request finished); use `add_request`
        and `stream` to keep the others' results in that case.
        """
        ids = [self.add_request(prompt, sampling) for prompt in prompts]
        requests = [self._requests[i] for i in ids]
        while not all(request.is_done for request in requests):
            self.step()
        for request_id in ids:
            self._requests.pop(request_id, None)
        failed = [request.error for request in requests if request.error is not None]
        if failed:
            raise failed[0]
        return [list(request.output_ids) for request in requests]

    def stream(self, request_id: int) -> Iterator[int]:
        """Yield the request's tokens as they are generated, stepping the engine while none is ready."""
        request = self.get_request(request_id)
        sent = 0
        while True:
            with self._lock:
                tokens, done = request.output_ids[sent:], request.is_done
            yield from tokens
            sent += len(tokens)
            if done:
                if request.error is not None:
                    raise request.error
                return
            if not tokens:
                self.step()

    def abort(self, request_id: int) -> bool:
        """Stop a request and free its blocks (device and CPU tier); False if it had already finished."""
        with self._lock:
            request = self.get_request(request_id)
            if request.is_done:
                return False
            self.scheduler.remove(request)
            self.memory.free(request)
            if request.swapped is not None:
                self.memory.discard(request.swapped)
                request.swapped = None
            request.finish(RequestStatus.ABORTED, FinishReason.ABORT)
            self.tracker.increment("aborted_requests")
            return True

    def get_request(self, request_id: int) -> Request:
        try:
            return self._requests[request_id]
        except KeyError:
            raise CacheValidationError(f"request_id={request_id!r} is not known to this engine") from None

    def check_invariants(self) -> None:
        """Raise `CacheError` with a named diff if a block leaked, is double counted, or a table disagrees."""
        with self._lock:
            check_engine(self)

    def serve_metrics(self, port: int = 9400, addr: str = "127.0.0.1") -> MetricsServer:
        """Serve `get_stats` in Prometheus format at `http://addr:port/metrics` (needs the `metrics` extra)."""
        from kv_cache.metrics import serve_metrics

        return serve_metrics(port, self.get_stats, addr)

    def get_stats(self, include_history: bool = False) -> dict[str, Any]:
        """Counters and gauges: requests, prefix cache (hit rate in prompt tokens), memory, preemption, tier.

        While a step runs this returns the snapshot taken after the previous step (never waits).
        """
        if self._lock.acquire(blocking=False):
            try:
                stats = self._stats()
            finally:
                self._lock.release()
        else:
            stats = dict(self._snapshot)
        if include_history:
            stats["history"] = self.tracker.history()
        return stats

    def request_stats(self, request_id: int) -> dict[str, Any]:
        """One request: tokens, prefix hits (and hit rate), recomputed tokens, preemptions, time to first token."""
        request = self.get_request(request_id)
        first = request.first_token_time
        return {
            "status": request.status.value,
            "prompt_tokens": len(request.prompt_ids),
            "output_tokens": len(request.output_ids),
            "prefix_hit_tokens": request.prefix_hit_tokens,
            "hit_rate": request.hit_rate,
            "recomputed_tokens": request.recomputed_tokens,
            "preemptions": request.preemptions,
            "time_to_first_token_s": None if first is None else first - request.arrival_time,
        }

    # ---------------------------------------------------------------------------------------------- inner
    def _step_once(self, outputs: list[tuple[int, int]]) -> None:
        plan = self.scheduler.schedule()
        if plan.decode:
            self._forward(plan.decode, 1, outputs)
        for request, count in plan.prefill:
            self._forward([request], count, outputs)

    @torch.no_grad()
    def _forward(self, requests: list[Request], count: int, outputs: list[tuple[int, int]]) -> None:
        """Compute `count` pending tokens of each request in one forward; sample where all are computed."""
        ids = [r.tokens[r.num_computed : r.num_computed + count] for r in requests]
        starts = torch.tensor([[r.num_computed] for r in requests], device=self.device)
        self._cache.seq_ids = [r.seq_id for r in requests if r.seq_id is not None]
        logits = self.model(
            input_ids=torch.tensor(ids, device=self.device),
            position_ids=starts + torch.arange(count, device=self.device),
            past_key_values=self._cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        for request, row in zip(requests, logits, strict=True):
            request.num_computed += count
            self.memory.register_blocks(request)
            if request.num_pending:
                continue
            token = request.sample(row)
            request.append_token(token)
            outputs.append((request.request_id, token))
            if request.first_token_time is None:
                request.first_token_time = time.perf_counter()
            if request.is_done:
                self.scheduler.remove(request)
                self.memory.free(request)
                self.tracker.increment("finished_requests")

    def _rollback(self) -> None:
        """After an OOM mid-step: cut each running sequence back to the tokens its request counts as computed."""
        for request in list(self.scheduler.running):
            if request.seq_id is None:
                continue
            try:
                self.store.truncate(request.seq_id, request.num_computed)
            except CacheError:  # e.g. a cut inside sealed blocks: recompute the request instead
                self.scheduler.requeue(request)

    def _after_step(self) -> None:
        mode = self.engine_config.invariant_check
        if mode is InvariantCheck.EVERY_STEP or (mode is InvariantCheck.IDLE and not self.scheduler.has_work):
            check_engine(self)
        if len(self._requests) > RETAINED_REQUESTS:  # forget the oldest finished requests
            done = [i for i, r in list(self._requests.items()) if r.is_done]  # list(): atomic under the GIL
            for request_id in done[: len(self._requests) - RETAINED_REQUESTS]:
                del self._requests[request_id]
        self._snapshot = self._stats()
        self.tracker.snapshot({k: v for k, v in self._snapshot.items() if not isinstance(v, dict)})

    def _stats(self) -> dict[str, Any]:
        counters = self.tracker.counters()
        prompt_tokens = counters.get("prompt_tokens", 0)
        stats: dict[str, Any] = {
            **store_gauges(self.store),
            **counters,
            "requests_waiting": len(self.scheduler.waiting),
            "requests_running": len(self.scheduler.running),
            "prefix_hit_rate": counters.get("prompt_hit_tokens", 0) / prompt_tokens if prompt_tokens else 0.0,
            **self.memory.stats(),
        }
        stats["prefix_cache"] = self.prefix_cache.stats() if self.prefix_cache is not None else {}
        stats["cpu_tier"] = self.tier.stats() if self.tier is not None else {}
        return stats


def _token_list(prompt_ids: Sequence[int] | torch.Tensor) -> list[int]:
    """A prompt as a list of ints; `CacheValidationError` unless it is a non-empty 1-D sequence of ids."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 1 or prompt_ids.is_floating_point():
            raise CacheValidationError(
                f"prompt_ids tensor must be 1-D integer ids; got shape {tuple(prompt_ids.shape)}"
            )
        prompt_ids = prompt_ids.tolist()
    tokens = list(prompt_ids)
    if not tokens or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in tokens):
        raise CacheValidationError("prompt_ids must be a non-empty sequence of token ids (ints >= 0)")
    return tokens


def _initialized_store(model: PreTrainedModel, config: KVCacheConfig, max_num_seqs: int) -> KVStore:
    """A store for the model's decoder layers, its pools allocated now (sized for `max_num_seqs` by default)."""
    text = model.config.get_text_config(decoder=True)
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    parameter = next(model.parameters())
    store = KVStore(config, len(attention_layer_types(model.config)))
    store.initialize(kv_heads, head_dim, parameter.dtype, parameter.device, max_num_seqs)
    return store


def _make_prefix_cache(
    model: PreTrainedModel, config: KVCacheConfig, engine_config: EngineConfig, store: KVStore, tier: CpuTier | None
) -> PrefixCache | None:
    """The prefix cache over the store's shareable pool (the sealed one when quantized), or None when off."""
    pool = store.quantized_pool or store.pool
    if not engine_config.enable_prefix_caching or pool is None:
        return None
    fingerprint = model_fingerprint(model.config, next(model.parameters()).dtype)
    root = root_hash(engine_config.namespace, fingerprint, pool.block_format)
    return PrefixCache(pool, config.cache_strategy, root, tier)


def _make_tier(store: KVStore, config: EngineConfig) -> CpuTier | None:
    """The CPU tier the config asks for (one host pool per store pool), or None."""
    if not config.has_cpu_tier:
        return None
    pools = [pool for pool in (store.pool, store.quantized_pool) if pool is not None]
    counts = host_blocks_per_format(pools, config.cpu_tier_blocks, config.cpu_tier_mb)
    return CpuTier([pool.block_format for pool in pools], counts, pools[0].device)
