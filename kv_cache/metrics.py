"""Prometheus exposition of any cache's or engine's stats (needs the `metrics` extra: prometheus-client).

    server = serve_metrics(9400, engine.get_stats)      # GET http://127.0.0.1:9400/metrics
    ...
    server.stop()
    print(metrics_text(cache.get_stats))                # the same text, without a server

`StatsCollector` calls a stats function (`KVCache.get_stats`, `BaseKVCache.get_stats`, `KVCacheEngine.get_stats`,
or anything returning such a dict) at each scrape and turns the keys listed in `METRICS` into metric families;
keys a given object lacks are skipped, and keys not listed are not exported (add a `MetricSpec` to export one).
Names follow Prometheus' conventions: a `kv_cache_` prefix, base units (`_bytes`, `_seconds`; MiB are
converted), `_total` on counters, and a label where the stats split one quantity: `state` (blocks, requests),
`policy` (evictions), `tier`, `kind` (errors), `operation` (profiled operations). Label values come from small
fixed sets; nothing is labelled per request or sequence. Profiled operations (`get_stats()["profiling"]`) become
the summary `kv_cache_operation_duration_seconds{operation}` and, on CUDA, the gauge
`kv_cache_operation_peak_memory_bytes{operation}`. A stats function that raises counts in
`kv_cache_exporter_scrape_errors_total` and the scrape returns only that counter.

prometheus-client is imported when a function here is first called, never at `import kv_cache`.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any

from kv_cache.errors import CacheValidationError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

logger = logging.getLogger(__name__)
StatsFn = Callable[[], Mapping[str, Any]]
MIB = 2.0**20
_NAME = re.compile(r"kv_cache_[a-z0-9_]+\Z")


class MetricKind(str, Enum):
    """The Prometheus type of an exported family."""

    COUNTER = "counter"  # only grows; the name ends in _total
    GAUGE = "gauge"


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric family and where its samples come from.

    `sources` are `(path, label value or None)` pairs: a path names a stats key, dotted into nested dicts
    (`"prefix_cache.lookups"`); a path ending in `.*` takes every entry of a `{label value: number}` dict (the
    tracker's `<name>_by_<label>` families). `label` names the one label (None: unlabelled); `scale` converts to
    the base unit (MiB to bytes).
    """

    name: str
    kind: MetricKind
    documentation: str
    sources: tuple[tuple[str, str | None], ...]
    label: str | None = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or self.name.endswith("_total") != (self.kind is MetricKind.COUNTER):
            raise CacheValidationError(
                f"name={self.name!r} must match kv_cache_[a-z0-9_]+ and end in _total exactly when it is a counter"
            )


def _counter(name: str, documentation: str, *sources: str | tuple[str, str], label: str | None = None) -> MetricSpec:
    return MetricSpec(name, MetricKind.COUNTER, documentation, tuple(_source(s) for s in sources), label)


def _gauge(
    name: str, documentation: str, *sources: str | tuple[str, str], label: str | None = None, scale: float = 1.0
) -> MetricSpec:
    return MetricSpec(name, MetricKind.GAUGE, documentation, tuple(_source(s) for s in sources), label, scale)


def _source(source: str | tuple[str, str]) -> tuple[str, str | None]:
    return (source, None) if isinstance(source, str) else source


METRICS: tuple[MetricSpec, ...] = (
    # the block store (every cache and the engine)
    _gauge("kv_cache_tokens", "Tokens held, summed over sequences (one layer).", "tokens"),
    _gauge("kv_cache_seen_tokens", "Tokens seen by live sequences, evicted ones included.", "tokens_seen"),
    _gauge("kv_cache_sequences", "Live sequences in the store.", "sequences"),
    _gauge("kv_cache_blocks", "Pool blocks by state.", ("blocks_used", "used"), ("blocks_free", "free"), label="state"),
    _gauge(
        "kv_cache_used_format_blocks",
        "Blocks in use by storage format.",
        ("quantized_blocks_used", "quantized"),
        ("full_precision_blocks_used", "full_precision"),
        label="format",
    ),
    _gauge("kv_cache_storage_bytes", "Bytes of K/V storage allocated.", "storage_memory_mb", scale=MIB),
    _gauge("kv_cache_used_bytes", "Bytes of the blocks in use.", "used_memory_mb", scale=MIB),
    _gauge("kv_cache_token_size_bytes", "Steady-state bytes per held token (all layers).", "bytes_per_token"),
    _gauge("kv_cache_effective_token_size_bytes", "Bytes in use per token seen.", "effective_bytes_per_token"),
    _gauge("kv_cache_compression_ratio", "Model-dtype bytes per token over stored bytes.", "compression_ratio"),
    # the tracker
    _counter("kv_cache_hit_tokens_total", "Tokens attention read from the cache.", "cached_tokens_read"),
    _counter("kv_cache_miss_tokens_total", "Tokens attention read from the current call.", "new_tokens_read"),
    _gauge("kv_cache_hit_ratio", "Cache hit tokens over all tokens read.", "hit_rate"),
    _counter(
        "kv_cache_evictions_total", "Tokens or blocks evicted, by policy.", "evictions_by_policy.*", label="policy"
    ),
    _counter("kv_cache_errors_total", "Errors, by kind.", "errors_by_kind.*", label="kind"),
    _gauge("kv_cache_tier_tokens", "Tokens held, by tier.", "tier_tokens_by_tier.*", label="tier"),
    _gauge("kv_cache_tier_bytes", "Bytes held, by tier.", "tier_bytes_by_tier.*", label="tier"),
    # the engine
    _gauge(
        "kv_cache_requests",
        "Requests by state.",
        ("requests_waiting", "waiting"),
        ("requests_running", "running"),
        label="state",
    ),
    _counter(
        "kv_cache_requests_completed_total",
        "Requests that left the engine, by status.",
        ("finished_requests", "finished"),
        ("aborted_requests", "aborted"),
        ("failed_requests", "failed"),
        label="status",
    ),
    _counter("kv_cache_prompt_tokens_total", "Prompt tokens scheduled.", "prompt_tokens"),
    _counter("kv_cache_prefix_hit_tokens_total", "Prompt tokens reused from the prefix cache.", "prompt_hit_tokens"),
    _gauge("kv_cache_prefix_hit_ratio", "Prefix hit tokens over prompt tokens.", "prefix_hit_rate"),
    _counter("kv_cache_recomputed_tokens_total", "Tokens recomputed after preemption.", "recomputed_tokens"),
    _counter(
        "kv_cache_preemptions_total",
        "Preemptions, by mode.",
        ("preempted_swap", "swap"),
        ("preempted_recompute", "recompute"),
        label="mode",
    ),
    _counter("kv_cache_swap_fallbacks_total", "Swaps that fell back to recompute.", "swap_fallbacks"),
    _counter(
        "kv_cache_swapped_blocks_total",
        "Blocks swapped, by direction.",
        ("swapped_out_blocks", "out"),
        ("swapped_in_blocks", "in"),
        label="direction",
    ),
    _counter("kv_cache_oom_errors_total", "Out-of-memory errors met.", "oom_errors"),
    _counter("kv_cache_oom_recoveries_total", "Out-of-memory errors recovered from.", "oom_recoveries"),
    _counter("kv_cache_oom_failures_total", "Out-of-memory errors that failed a request.", "oom_failures"),
    # the prefix cache and the CPU tier (engine stats' nested dicts)
    _counter("kv_cache_prefix_lookups_total", "Prefix-cache lookups.", "prefix_cache.lookups"),
    _counter("kv_cache_prefix_hit_blocks_total", "Blocks found by prefix lookups.", "prefix_cache.hit_blocks"),
    _counter("kv_cache_prefix_evicted_blocks_total", "Cached blocks evicted.", "prefix_cache.evicted_blocks"),
    _counter(
        "kv_cache_prefix_verify_failures_total", "Hash hits whose tokens differed.", "prefix_cache.verify_failures"
    ),
    _gauge(
        "kv_cache_prefix_cached_blocks",
        "Cached prefix blocks, by residency.",
        ("prefix_cache.cached_blocks", "device"),
        ("prefix_cache.cached_host_blocks", "host"),
        label="residency",
    ),
    _gauge("kv_cache_cpu_tier_bytes", "CPU tier bytes allocated.", "cpu_tier.memory_mb", scale=MIB),
    _gauge("kv_cache_cpu_tier_used_blocks", "CPU tier blocks in use.", "cpu_tier.blocks_used"),
    _counter(
        "kv_cache_cpu_tier_transfer_bytes_total",
        "Bytes copied, by direction.",
        ("cpu_tier.bytes_to_cpu", "to_cpu"),
        ("cpu_tier.bytes_to_device", "to_device"),
        label="direction",
    ),
)


def _prometheus() -> ModuleType:
    """prometheus_client, or an `ImportError` saying which extra installs it."""
    try:
        import prometheus_client
        import prometheus_client.core  # the *MetricFamily classes; not loaded by the package itself
    except ImportError as exc:
        raise ImportError(
            "kv_cache.metrics needs prometheus-client: pip install 'kv-cache-engine[metrics]' "
            "(or pip install prometheus-client)"
        ) from exc
    return prometheus_client


class StatsCollector:
    """A prometheus-client collector that reads `stats_fn()` at each scrape and exports it as `specs` say."""

    def __init__(self, stats_fn: StatsFn, specs: Sequence[MetricSpec] = METRICS) -> None:
        if not callable(stats_fn):
            raise CacheValidationError(f"stats_fn={stats_fn!r} must be callable, e.g. cache.get_stats")
        self.stats_fn = stats_fn
        self.specs = tuple(specs)
        self.scrape_errors = 0
        self._lock = threading.Lock()

    def describe(self) -> Iterator[Metric]:
        """The families without samples (lets a registry reject duplicate names at registration)."""
        for spec in self.specs:
            yield _family(spec)
        yield from _profiling_families({})
        yield self._errors_family()

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.stats_fn()
        except Exception:  # a scrape must answer: count the failure, export what is known
            with self._lock:
                self.scrape_errors += 1
                first = self.scrape_errors == 1
            log = logger.exception if first else logger.debug  # once, not at every scrape interval
            log("kv_cache metrics: the stats function raised; exporting the error count only")
            yield self._errors_family()
            return
        for spec in self.specs:
            family = _family(spec)
            for labels, value in _samples(spec, stats):
                family.add_metric(labels, value)
            if family.samples:
                yield family
        yield from _profiling_families(stats.get("profiling") or {})
        yield self._errors_family()

    def _errors_family(self) -> Metric:
        errors = "Scrapes whose stats function raised."
        family: Metric = _prometheus().core.CounterMetricFamily(
            "kv_cache_exporter_scrape_errors_total", errors, value=self.scrape_errors
        )
        return family


def _family(spec: MetricSpec) -> Any:
    core = _prometheus().core
    cls = core.CounterMetricFamily if spec.kind is MetricKind.COUNTER else core.GaugeMetricFamily
    return cls(spec.name, spec.documentation, labels=[spec.label] if spec.label else [])


def _samples(spec: MetricSpec, stats: Mapping[str, Any]) -> Iterator[tuple[list[str], float]]:
    """`(label values, value)` of each source of `spec` found in `stats` as a number."""
    for path, label_value in spec.sources:
        if path.endswith(".*"):
            entries = _lookup(stats, path[:-2])
            for key, value in entries.items() if isinstance(entries, Mapping) else ():
                if _is_number(value):
                    yield [str(key)], float(value) * spec.scale
            continue
        value = _lookup(stats, path)
        if _is_number(value):
            yield ([] if label_value is None else [label_value]), float(value) * spec.scale


def _lookup(stats: Mapping[str, Any], path: str) -> Any:
    value: Any = stats
    for key in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _profiling_families(profiling: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    """Profiled operations: a duration summary (count, sum in seconds) and, on CUDA, a peak-memory gauge."""
    core = _prometheus().core
    duration = core.SummaryMetricFamily(
        "kv_cache_operation_duration_seconds", "Profiled cache operations: calls and seconds.", labels=["operation"]
    )
    peak = core.GaugeMetricFamily(
        "kv_cache_operation_peak_memory_bytes", "Most bytes one call allocated above its start (CUDA).",
        labels=["operation"],
    )  # fmt: skip
    for operation, row in profiling.items():
        duration.add_metric([operation], count_value=row["count"], sum_value=row["total_ms"] / 1e3)
        if row.get("peak_memory_bytes") is not None:
            peak.add_metric([operation], row["peak_memory_bytes"])
    yield duration
    yield peak


def make_registry(stats_fn: StatsFn, specs: Sequence[MetricSpec] = METRICS) -> CollectorRegistry:
    """A fresh registry holding one `StatsCollector` (not the global one: several caches may be exported)."""
    registry = _prometheus().CollectorRegistry()
    registry.register(StatsCollector(stats_fn, specs))
    return registry


def metrics_text(stats_fn: StatsFn) -> str:
    """The Prometheus text exposition of `stats_fn()` now (what a scrape would return)."""
    prometheus = _prometheus()
    text: bytes = prometheus.generate_latest(make_registry(stats_fn))
    return text.decode()


class MetricsServer:
    """A running `/metrics` endpoint; `stop()` (or leaving a `with` block) shuts it down."""

    def __init__(self, server: Any, thread: threading.Thread, registry: CollectorRegistry) -> None:
        self._server = server
        self._thread = thread
        self.registry = registry
        self.host, self.port = server.server_address[:2]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()


def serve_metrics(port: int, stats_fn: StatsFn, addr: str = "127.0.0.1") -> MetricsServer:
    """Serve `stats_fn`'s metrics at `http://addr:port/metrics` on a daemon thread; returns the handle to stop.

    Args:
        port: TCP port; 0 picks a free one (read it from the handle's `port`).
        stats_fn: e.g. `engine.get_stats`; called once per scrape, on the server's thread.
        addr: interface to listen on; the default is loopback only, "0.0.0.0" lets other hosts scrape.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise CacheValidationError(f"port={port!r} must be an int in 0..65535 (0 picks a free port)")
    registry = make_registry(stats_fn)
    try:
        server, thread = _prometheus().start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise CacheValidationError(
            f"port={port} on addr={addr!r} could not be bound ({exc}); use a free port, or 0 to pick one"
        ) from exc
    return MetricsServer(server, thread, registry)
