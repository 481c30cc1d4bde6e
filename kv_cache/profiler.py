"""`Profiler`: opt-in per-operation wall-clock timing of cache operations.

Disabled, `record` returns one shared no-op context manager, so the hot path pays a method call and nothing else.
Enabled, each operation's count, total, mean and max time (perf counters, milliseconds) are accumulated.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass


@dataclass
class OperationTiming:
    count: int = 0
    total_ms: float = 0.0
    max_ms: float = 0.0

    def as_dict(self) -> dict[str, float]:
        mean = self.total_ms / self.count if self.count else 0.0
        return {"count": self.count, "total_ms": self.total_ms, "mean_ms": mean, "max_ms": self.max_ms}


_NO_OP = contextlib.nullcontext()


class Profiler:
    """Accumulates timings per operation name while `enabled`."""

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled
        self._timings: dict[str, OperationTiming] = {}
        self._lock = threading.Lock()

    def record(self, operation: str) -> AbstractContextManager[None]:
        """Context manager timing one occurrence of `operation` (a no-op when disabled)."""
        return self._timed(operation) if self.enabled else _NO_OP

    @contextlib.contextmanager
    def _timed(self, operation: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed_ms = (time.perf_counter() - start) * 1e3
            with self._lock:
                timing = self._timings.setdefault(operation, OperationTiming())
                timing.count += 1
                timing.total_ms += elapsed_ms
                timing.max_ms = max(timing.max_ms, elapsed_ms)

    def summary(self) -> dict[str, dict[str, float]]:
        """`{operation: {count, total_ms, mean_ms, max_ms}}`."""
        with self._lock:
            return {name: timing.as_dict() for name, timing in sorted(self._timings.items())}

    def reset(self) -> None:
        with self._lock:
            self._timings.clear()

    def print_stats(self) -> None:
        """Print one line per operation: count, total, mean and max milliseconds."""
        print(f"{'operation':<24}{'count':>10}{'total ms':>12}{'mean ms':>10}{'max ms':>10}")
        for name, row in self.summary().items():
            print(f"{name:<24}{row['count']:>10}{row['total_ms']:>12.3f}{row['mean_ms']:>10.4f}{row['max_ms']:>10.3f}")
