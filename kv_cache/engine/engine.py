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

With `EngineConfig.redis_url` the prefix cache continues in Redis (`kv_cache.tiers.remote`): blocks missing
locally are fetched when that beats recomputing them (the engine times its prefill forwards for the estimate,
after a short calibration at construction), and blocks it computes are written down after each step. A Redis that
is down, slow or returns garbage costs misses, never errors or different tokens; `close()` releases it.

Threads: `add_request` may be called from any thread while another steps; `step`, `stream`, `abort` serialise on
the engine's lock; `get_stats` never waits for a step (it returns the last step's snapshot while one runs).
"""

from __future__ import annotations

import inspect
import itertools
import math
import threading
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel

from kv_cache.config import KVCacheConfig
from kv_cache.decode_graphs import StepGraph, graphable, padded_size
from kv_cache.devices import device_tensor
from kv_cache.engine.components import initialized_store, make_prefix_cache, make_remote, make_tier
from kv_cache.engine.config import EngineConfig, InvariantCheck
from kv_cache.engine.invariants import check_engine
from kv_cache.engine.request import FinishReason, Request, RequestStatus, SamplingParams
from kv_cache.engine.scheduler import Scheduler
from kv_cache.errors import CacheError, CacheMemoryError, CacheValidationError
from kv_cache.hf_attention import register_attention
from kv_cache.hf_cache import KVCache, attention_layer_types
from kv_cache.memory_manager import BlockNeeds, MemoryManager

if TYPE_CHECKING:
    from kv_cache.metrics import MetricsServer
from kv_cache.stats import CacheStatsTracker, store_gauges
from kv_cache.tiers.remote import FetchCost

PREFILL_GRAPH_TOKENS = 512  # prefill chunks up to this many tokens replay graphs; longer ones are GPU-bound
RETAINED_REQUESTS = 1024  # finished requests kept for `get_request`/`request_stats`/`stream`, the newest first


class KVCacheEngine:
    """Continuous batching with prefix caching, a CPU tier and preemption over one `KVStore`.

    Args:
        model: a Hugging Face causal LM (decoder layers of full or sliding attention), in eval mode.
        config: the cache: block size, pool size (`num_blocks` or `memory_budget_mb`; by default room for
            `max_num_seqs` sequences of `max_tokens`), dtype, quantization, and the prefix-cache eviction strategy.
        engine_config: scheduling, prefix caching, preemption, CPU and Redis tier settings (`EngineConfig()` if
            None).
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
        if config.low_rank_ratio is not None:  # shared prefix blocks need one basis for every request
            raise CacheValidationError(
                "low_rank_ratio is not supported by KVCacheEngine: its blocks are shared across requests, each of "
                "which would fit its own basis; unset it, or use KVCache with model.generate"
            )
        model.set_attn_implementation(register_attention())
        graphs = engine_config.decode_graphs
        self._graphs = self.device.type == "cuda" if graphs is None else graphs
        # A long fresh quantized chunk is sealed after it is written whole (`_run_model`) where that leaves what
        # attention reads unchanged, every layer attending the prompt's own exact states (no sliding window): room
        # for one chunk in the tail pool. A step graph seals any chunk longer than the window after it.
        full_attention = all(t == "full_attention" for t in attention_layer_types(model.config))
        self._seals_fresh_chunks_after = config.use_quantization and full_attention
        spare = max(
            engine_config.prefill_chunk_size if self._seals_fresh_chunks_after else 0,
            PREFILL_GRAPH_TOKENS if self._graphs else 0,
        )
        self.store = initialized_store(model, config, engine_config.max_num_seqs, spare)
        self._cache = KVCache(model_config=model.config, store=self.store)
        self._takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters
        self.tier = make_tier(self.store, engine_config)
        self.prefix_cache = make_prefix_cache(model, config, engine_config, self.store, self.tier)
        self.remote = make_remote(engine_config, self.prefix_cache)
        tiers = (self.tier, self.remote)
        self.memory = MemoryManager(engine_config, self.device, self.store, self.prefix_cache, tiers)
        self.tracker = CacheStatsTracker(config.history_size, config.snapshot_interval_s)
        self.scheduler = Scheduler(engine_config, self.memory, self.tracker)
        self._requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._admission = threading.Lock()  # ids are handed out in the order requests join the queue
        self._snapshot: dict[str, Any] = {}
        if self.remote is not None:
            self._calibrate(self.remote.cost)
        self._snapshot = self._stats()  # what get_stats shows while the first step runs

    # ------------------------------------------------------------------------------------------------ API
    def add_request(self, prompt_ids: Sequence[int] | torch.Tensor, sampling: SamplingParams | None = None) -> int:
        """Queue a prompt (token ids, `[tokens]`); returns its request id. It joins the batch at the next step.

        A request that could never fit (longer than `max_tokens`, or than the whole pool) fails at once: its
        `stream` raises `CacheMemoryError` and `get_request(...).error` says what to change.
        """
        prompt = _token_list(prompt_ids)
        with self._admission:
            request_id = next(self._ids)
            request = Request(request_id, prompt, sampling or SamplingParams(), arrival=request_id)
            request.arrival_time = time.perf_counter()
            self._requests[request_id] = request
            self._enqueue(request)
        return request_id

    def _enqueue(self, request: Request) -> None:
        """Queue a new request, or fail it at once if it can never fit."""
        prompt, request_id = request.prompt_ids, request.request_id
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

    def step(self) -> list[tuple[int, int]]:
        """Run one scheduling step; returns `(request id, new token)` for every token generated in it."""
        with self._lock:
            outputs: list[tuple[int, int]] = []
            self.memory.run_with_oom_retry(lambda: self._step_once(outputs), self._rollback)
            if self.remote is not None:  # after the step's tokens are out: never on a request's first token
                self.remote.write_down()
            self._after_step()
            return outputs

    def close(self) -> None:
        """Release the Redis tier (pending writes get a bounded time; its thread and connections end). The
        engine goes on serving from its local tiers."""
        with self._lock:
            if self.remote is not None:
                self.remote.close()

    def __enter__(self) -> KVCacheEngine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

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
        seq_ids = [r.seq_id for r in requests if r.seq_id is not None]
        start = time.perf_counter()
        try:
            logits = self._run_model(seq_ids, ids, [r.num_computed for r in requests])
        except BaseException:  # the layers before the failure (or a failed seal after the step) hold the chunk
            self._cut_back(requests)
            raise
        if self.remote is not None and count > 1:  # a prefill: what a Redis hit must beat
            self.remote.cost.record_prefill(count * len(requests), self._seconds_since(start))
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

    def _run_model(self, seq_ids: list[int], ids: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Logits `[batch, vocab]` after the last of `ids[i]` (equal counts of new tokens per row), appended to
        sequence `seq_ids[i]` from position `starts[i]` (the sequence's length: a decode graph takes it from the
        store)."""
        count = len(ids[0])
        self._cache.seq_ids = seq_ids
        graph = self._step_graph(len(seq_ids), count)
        if graph is not None:
            self._room_for_padding(seq_ids, graph.static.tokens, count)
            try:
                return graph(device_tensor(ids, torch.long, self.device)).logits[:, -1]
            except CacheMemoryError:  # the padded chunk does not fit where the chunk itself does: run it eagerly
                if graph.static.tokens == count:
                    raise
        positions = device_tensor([[start] for start in starts], torch.long, self.device)
        # A fresh quantized prompt longer than the window is written whole in full precision and sealed after the
        # step, every layer in one seal (one sync) instead of one per layer. It attends its own exact states either
        # way (KIVI prefill), so its tokens and codes are the same: a prefix hit still gives a miss's tokens. Later
        # chunks, or without room in the tail pool, each layer seals its own.
        seal_after = (
            self._seals_fresh_chunks_after
            and count > self.store.config.residual_tokens
            and not any(starts)
            and self.store.fits_unsealed(seq_ids, count)
        )
        self._cache.seal_after_step = seal_after
        try:
            logits = self.model(
                input_ids=device_tensor(ids, torch.long, self.device),
                position_ids=positions + torch.arange(count, device=self.device),
                past_key_values=self._cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
            if seal_after:
                self.store.seal(seq_ids)
        finally:
            self._cache.seal_after_step = False
        return logits

    def _room_for_padding(self, seq_ids: list[int], padded: int, count: int) -> None:
        """A step graph of `padded` tokens per row writes the padding too (cut off after the step); the scheduler made
        room for `count`. Where the prefix cache holds the rest of the pool, evict what the padding needs, so the
        step replays instead of running eagerly (as it must when the padded step does not fit)."""
        if padded == count or self.prefix_cache is None:
            return
        needs = [self.memory.append_needs(seq_id, padded) for seq_id in seq_ids]
        self.memory.make_room(sum(needs, BlockNeeds()))

    def _step_graph(self, rows: int, tokens: int) -> StepGraph | None:
        """The step graph for `rows` sequences of `tokens` new tokens each, padded to the next power of two (rows
        up to `max_num_seqs`; tokens from 16 up to `PREFILL_GRAPH_TOKENS`); made on first use and kept on the
        cache. None: the step runs eagerly (graphs off, a longer chunk, or a cache `graphable` refuses)."""
        if not self._graphs or tokens > PREFILL_GRAPH_TOKENS or not graphable(self._cache, rows):
            return None
        batch = padded_size(rows, self.engine_config.max_num_seqs)
        width = 1 if tokens == 1 else padded_size(max(tokens, 16), PREFILL_GRAPH_TOKENS)
        runner = self._cache.decode_graphs.get((batch, width))
        if runner is None:
            options = {"logits_to_keep": 1, "cache_position": self._takes_cache_position}
            runner = StepGraph(self.model, self._cache, batch, options, width)
            self._cache.decode_graphs[(batch, width)] = runner
        return runner

    def _seconds_since(self, start: float) -> float:
        """Seconds from `start` (`time.perf_counter()`) until the device finished what was queued."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    @torch.no_grad()
    def _calibrate(self, cost: FetchCost) -> None:
        """Seed the recompute estimate: prefill forwards of one and of eight blocks on a scratch sequence, each the
        best of three after a warm-up (the fastest run is the least disturbed by other work on the machine). A pool
        too small for them leaves it unmeasured (Redis then waits for a measurement)."""
        sizes = (self.store.block_size, 8 * self.store.block_size)
        best = dict.fromkeys(sizes, math.inf)
        for index, tokens in enumerate((sizes[0], *sizes * 3)):
            seq_id = self.store.add_sequence()
            try:
                start = time.perf_counter()
                self._run_model([seq_id], [[0] * tokens], [0])
                if index:  # the first run warms up
                    best[tokens] = min(best[tokens], self._seconds_since(start))
            except CacheMemoryError:
                return
            finally:
                self.store.free(seq_id)
        cost.calibrate((sizes[0], best[sizes[0]]), (sizes[1], best[sizes[1]]))

    def _rollback(self) -> None:
        """After an OOM mid-step: cut each running sequence back to the tokens its request counts as computed."""
        self._cut_back(list(self.scheduler.running))

    def _cut_back(self, requests: list[Request]) -> None:
        """Cut each request's sequence back to the tokens it counts as computed, or requeue it to recompute them
        where that fails (a cut inside sealed blocks needs a free full-precision block)."""
        for request in requests:
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
        stats["redis"] = self.remote.stats() if self.remote is not None else {}
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
