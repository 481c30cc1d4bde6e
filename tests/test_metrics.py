"""`kv_cache.metrics`: the exposition of a cache's and an engine's stats, naming rules, the HTTP endpoint."""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import pytest
import torch

from kv_cache import BaseKVCache, CacheValidationError, KVCacheConfig
from kv_cache.metrics import METRICS, MetricKind, MetricSpec, StatsCollector, make_registry, metrics_text, serve_metrics

LABELS = {"state", "format", "policy", "kind", "tier", "status", "mode", "direction", "residency"}


@pytest.fixture
def prometheus() -> ModuleType:
    """prometheus_client: required in CI (the `metrics` extra), skipped elsewhere when missing."""
    try:
        import prometheus_client
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("prometheus-client is missing: CI installs the 'metrics' extra")
        pytest.skip("prometheus-client is not installed (pip install 'kv-cache-engine[metrics]')")
    return prometheus_client


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """`{(sample name, sorted labels): value}` of a text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def busy_cache() -> BaseKVCache:
    cache = BaseKVCache(KVCacheConfig(max_tokens=64, block_size=4, enable_profiling=True))
    cache.forward(torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8))
    cache.forward(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))
    cache.tracker.record_eviction("lru", 8)
    cache.tracker.record_error(CacheValidationError("bad"))
    cache.tracker.set_tier_usage("cpu", tokens=16, nbytes=2048)
    return cache


@pytest.mark.usefixtures("prometheus")
def test_specs_follow_prometheus_naming() -> None:
    names = [spec.name for spec in METRICS]
    assert len(names) == len(set(names))
    for spec in METRICS:
        assert spec.name.startswith("kv_cache_") and spec.name == spec.name.lower()
        assert spec.name.endswith("_total") == (spec.kind is MetricKind.COUNTER), spec.name
        assert "_mb" not in spec.name and "_ms" not in spec.name, spec.name  # base units only
        assert spec.label is None or spec.label in LABELS, spec.label
        labelled = [value is not None or path.endswith(".*") for path, value in spec.sources]
        assert all(labelled) if spec.label else not any(labelled), spec.name


def test_cache_stats_exposition(prometheus: ModuleType) -> None:
    cache = busy_cache()
    stats = cache.get_stats()
    samples = scrape(metrics_text(cache.get_stats))
    assert samples[("kv_cache_tokens", ())] == 12
    assert samples[("kv_cache_blocks", (("state", "used"),))] == stats["blocks_used"] == 4
    assert samples[("kv_cache_blocks", (("state", "free"),))] == stats["blocks_free"]
    assert samples[("kv_cache_storage_bytes", ())] == stats["storage_memory_mb"] * 2**20
    assert samples[("kv_cache_hit_tokens_total", ())] == 10 and samples[("kv_cache_miss_tokens_total", ())] == 12
    assert samples[("kv_cache_hit_ratio", ())] == pytest.approx(10 / 22)
    assert samples[("kv_cache_evictions_total", (("policy", "lru"),))] == 8
    assert samples[("kv_cache_errors_total", (("kind", "validation"),))] == 1
    assert samples[("kv_cache_tier_bytes", (("tier", "cpu"),))] == 2048
    operation = (("operation", "forward"),)
    assert samples[("kv_cache_operation_duration_seconds_count", operation)] == 2
    assert samples[("kv_cache_operation_duration_seconds_sum", operation)] > 0
    assert samples[("kv_cache_exporter_scrape_errors_total", ())] == 0
    assert ("kv_cache_requests", (("state", "running"),)) not in samples  # engine keys: absent, not zero


def test_nested_engine_style_stats_and_non_numbers(prometheus: ModuleType) -> None:
    stats: dict[str, Any] = {
        "requests_waiting": 3,
        "requests_running": 2,
        "finished_requests": 7,
        "preempted_swap": 1,
        "prefix_cache": {"lookups": 9, "hit_blocks": 4, "cached_blocks": 5, "cached_host_blocks": 2},
        "cpu_tier": {"memory_mb": 1.5, "bytes_to_cpu": 4096, "pinned": True},
        "tokens": "not a number",
        "blocks_used": True,
    }
    samples = scrape(metrics_text(lambda: stats))
    assert samples[("kv_cache_requests", (("state", "waiting"),))] == 3
    assert samples[("kv_cache_requests_completed_total", (("status", "finished"),))] == 7
    assert samples[("kv_cache_preemptions_total", (("mode", "swap"),))] == 1
    assert samples[("kv_cache_prefix_lookups_total", ())] == 9
    assert samples[("kv_cache_prefix_cached_blocks", (("residency", "host"),))] == 2
    assert samples[("kv_cache_cpu_tier_bytes", ())] == 1.5 * 2**20
    assert samples[("kv_cache_cpu_tier_transfer_bytes_total", (("direction", "to_cpu"),))] == 4096
    assert not any(name in {"kv_cache_tokens", "kv_cache_blocks"} for name, _ in samples)


def test_engine_stats_export(prometheus: ModuleType) -> None:
    from kv_cache.engine import KVCacheEngine, SamplingParams
    from kv_cache.reference_model import encode, load_reference_model

    model = load_reference_model()
    engine = KVCacheEngine(model, KVCacheConfig(num_blocks=64, block_size=8, max_tokens=128, device="cpu"))
    engine.generate([encode("def f(x):").tolist(), encode("import os").tolist()], SamplingParams(max_new_tokens=3))
    samples = scrape(metrics_text(engine.get_stats))
    assert samples[("kv_cache_requests_completed_total", (("status", "finished"),))] == 2
    assert samples[("kv_cache_requests", (("state", "running"),))] == 0
    assert samples[("kv_cache_prompt_tokens_total", ())] == engine.get_stats()["prompt_tokens"] > 0


def test_a_failing_stats_function_is_counted(prometheus: ModuleType) -> None:
    def broken() -> Mapping[str, Any]:
        raise RuntimeError("store is gone")

    collector = StatsCollector(broken)
    registry = prometheus.CollectorRegistry()
    registry.register(collector)
    for _ in range(2):
        samples = scrape(prometheus.generate_latest(registry).decode())
    assert samples == {("kv_cache_exporter_scrape_errors_total", ()): 2}


def test_custom_specs_and_duplicate_registration(prometheus: ModuleType) -> None:
    spec = MetricSpec("kv_cache_widgets_total", MetricKind.COUNTER, "Widgets.", (("widgets", None),))
    registry = make_registry(lambda: {"widgets": 4}, [spec])
    assert scrape(prometheus.generate_latest(registry).decode())[("kv_cache_widgets_total", ())] == 4
    with pytest.raises(ValueError, match="Duplicated"):
        registry.register(StatsCollector(lambda: {}, [spec]))
    with pytest.raises(CacheValidationError, match="name='kv_cache_widgets'"):
        MetricSpec("kv_cache_widgets", MetricKind.COUNTER, "Widgets.", (("widgets", None),))
    with pytest.raises(CacheValidationError, match="stats_fn"):
        StatsCollector({"not": "callable"})  # type: ignore[arg-type]


def test_http_endpoint_serves_and_stops(prometheus: ModuleType) -> None:
    cache = busy_cache()
    with serve_metrics(0, cache.get_stats) as server:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(server.url, timeout=5) as response:
            assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
            samples = scrape(response.read().decode())
        assert samples[("kv_cache_tokens", ())] == 12
        with pytest.raises(CacheValidationError, match=f"port={server.port}.*could not be bound"):
            serve_metrics(server.port, cache.get_stats)
    with socket.socket() as probe, pytest.raises(OSError):
        probe.settimeout(1)
        probe.connect(("127.0.0.1", server.port))
    server.stop()  # idempotent


@pytest.mark.parametrize("port", [-1, 70000, "9400", True])
def test_bad_ports_are_refused(port: object) -> None:
    with pytest.raises(CacheValidationError, match="port="):
        serve_metrics(port, dict)  # type: ignore[arg-type]


def test_missing_prometheus_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # makes `import prometheus_client` fail
    with pytest.raises(ImportError, match=r"kv-cache-engine\[metrics\]"):
        metrics_text(dict)
