"""Shared fixtures: real `redis-server` processes for the Redis tier's tests and for engine tests that use it;
the shipped reference model (`model`, per module: a test file with another model defines its own `model`); and
`one_intra_op_thread`, which test files driving tiny models through the engine apply to themselves.

`redis_server` is one server on a free loopback port with persistence off (`--save '' --appendonly no`);
`start_redis(*options, start=True)` makes more (or one not yet started, for "down at start"). Each is killed at
teardown (SIGCONT first, in case a test stopped it). redis-server comes from scripts/install_services.sh: when it
is missing the tests fail in CI (env CI set) and are skipped elsewhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from kv_cache.reference_model import load_reference_model


class RedisServer:
    """A `redis-server` child process on 127.0.0.1:`port`, persistence off; `options` are extra arguments."""

    def __init__(self, directory: Path, *options: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.directory = directory
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def password(self) -> str | None:
        return self.options[self.options.index("--requirepass") + 1] if "--requirepass" in self.options else None

    def start(self) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        import redis

        command = [str(shutil.which("redis-server")), "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.directory), "--loglevel", "warning"]
        self.process = subprocess.Popen([*command, *self.options], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.admin().ping()
                return
            except redis.ConnectionError:
                time.sleep(0.01)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def admin(self) -> Any:
        """A plain redis-py client (5 s timeouts) for setting up and inspecting the server."""
        import redis

        return redis.Redis(port=self.port, password=self.password, socket_timeout=5)

    def signal(self, signum: int) -> None:
        """Send `signum` (SIGSTOP hangs it, SIGCONT resumes it) if it is running."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def kill(self) -> None:
        """kill -9 and reap it."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Factory: `start_redis(*options, start=True)` -> a `RedisServer`; all are killed at teardown."""
    if not shutil.which("redis-server"):
        message = "redis-server not found: run scripts/install_services.sh (installs it with apt-get)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    servers: list[RedisServer] = []

    def make(*options: str, start: bool = True) -> RedisServer:
        servers.append(RedisServer(tmp_path, *options))
        if start:
            servers[-1].start()
        return servers[-1]

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
def redis_server(start_redis: Callable[..., RedisServer]) -> RedisServer:
    """One running server with default options."""
    return start_redis()


@pytest.fixture(scope="module")
def model() -> PreTrainedModel:
    """The shipped 3M-parameter reference model, loaded once per test module."""
    return load_reference_model()


@pytest.fixture(scope="module")
def one_intra_op_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two spinning OpenMP threads
    per process made the engine tests 30x slower (measured). Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
