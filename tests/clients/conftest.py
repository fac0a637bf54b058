"""Sidecars for client tests: the real one on its own thread (so a blocking client can call
it), a slow one, a killable slow one in another process, and a port nobody listens on."""

import asyncio
import importlib.util
import socket
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import numpy as np
import pytest

from solaris.app.compose import sidecar_parts
from solaris.server.settings import SidecarSettings
from tests.clients.faulty_sidecar import start_slow_sidecar
from tests.conftest import DIM

MODEL_VERSION = "model-v1"
T = TypeVar("T")


class ThreadedSidecar:
    """A real Sidecar served by an event loop on a background thread."""

    def __init__(self, settings: SidecarSettings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.parts = sidecar_parts(settings)
        self.sidecar = self.parts.sidecar()
        self._run(self.sidecar.start())

    @property
    def address(self) -> str:
        return self.sidecar.address

    def put(self, user_id: str, item_ids: Sequence[str], vectors: np.ndarray) -> None:
        self._run(self.sidecar.service.put(user_id, item_ids, vectors, MODEL_VERSION))

    def queued_pairs(self) -> int:
        return self.parts.prefetch_queue.pairs

    def stop(self) -> None:
        self._run(self.sidecar.stop(grace=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def threaded_sidecar(settings: SidecarSettings) -> Iterator[ThreadedSidecar]:
    running = ThreadedSidecar(settings)
    yield running
    running.stop()


@pytest.fixture
def slow_sidecar() -> Iterator[str]:
    """Answers BatchGet after 2 s: far past any deadline the tests give."""
    server, port = start_slow_sidecar(delay=2.0, dim=DIM)
    yield f"127.0.0.1:{port}"
    server.stop(grace=0)


@pytest.fixture
def killable_sidecar() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A slow sidecar in its own process, for a test to SIGKILL mid-call."""
    command = [sys.executable, "-m", "tests.clients.faulty_sidecar", "--delay", "30"]
    process = subprocess.Popen([*command, "--dim", str(DIM)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    port = int(process.stdout.readline())
    yield process, f"127.0.0.1:{port}"
    process.kill()
    process.wait()
    process.stdout.close()


@pytest.fixture
def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"


def vectors(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)


def load_example_ranker() -> ModuleType:
    """clients/examples/ranker.py: a script beside the package, not part of it, so by path."""
    path = Path(__file__).parents[2] / "clients" / "examples" / "ranker.py"
    spec = importlib.util.spec_from_file_location("example_ranker", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
