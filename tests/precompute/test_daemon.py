"""The daemon fills the store from Prefetch hints: over gRPC against the embedded sidecar,
and, for failures, with a model that fails on chosen pairs."""

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import grpc
import numpy as np
import pytest

from solaris.app.compose import SidecarParts, build_sidecar, sidecar_parts
from solaris.precompute.daemon import HistoryBook, PrecomputeDaemon, history_size
from solaris.precompute.embedded_speculation import EmbeddedSpeculation
from solaris.precompute.export import ExportReport
from solaris.precompute.features import UserWork
from solaris.precompute.runner import OnnxRunner
from solaris.precompute.settings import PrecomputeSettings
from solaris.server.l1 import MemoryStore
from solaris.server.prefetch_queue import PrefetchQueue, PrefetchTask
from solaris.server.settings import SidecarSettings
from solaris.server.sidecar import Sidecar
from solaris.server.store import FLOAT32, RowStatus
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub
from tests.conftest import DIM, wait_until
from tests.ops.test_metrics import scrape
from tests.precompute.test_runner import pytorch_embedding
from tests.server.serving import free_port, wait_until_serving


async def batch_get_when_all_hit(
    stub: EmbeddingStoreStub, user: str, items: list[str]
) -> pb.BatchGetResponse:
    """The first answer with every row a HIT, or the last one after ten seconds."""
    end = time.monotonic() + 10.0
    while True:
        answer = await stub.BatchGet(pb.BatchGetRequest(user_id=user, item_ids=items))
        if all(status == pb.HIT for status in answer.statuses) or time.monotonic() > end:
            return answer
        await asyncio.sleep(0.01)


def values_of(answer: pb.BatchGetResponse) -> np.ndarray:
    return np.frombuffer(answer.embeddings, "<f4").reshape(-1, answer.dim)


async def test_prefetched_pairs_are_served_as_the_model_computes_them(
    stub: EmbeddingStoreStub, tiny_model: ExportReport
) -> None:
    history = ["h1", "h2", "h3"]

    queued = await stub.Prefetch(
        pb.PrefetchRequest(user_id="u", item_ids=["a", "b"], history=history)
    )
    answer = await batch_get_when_all_hit(stub, "u", ["b", "a"])

    assert queued.queued == 2
    assert list(answer.statuses) == [pb.HIT, pb.HIT]
    assert answer.model_version == tiny_model.model_version
    expected = [pytorch_embedding("u", tuple(history), item) for item in ("b", "a")]
    np.testing.assert_allclose(values_of(answer), np.stack(expected), atol=1e-5)


async def test_fresh_pairs_are_not_computed_again(
    embedded: Sidecar, embedded_parts: SidecarParts, stub: EmbeddingStoreStub
) -> None:
    await stub.Prefetch(pb.PrefetchRequest(user_id="u", item_ids=["a", "b"]))
    await batch_get_when_all_hit(stub, "u", ["a", "b"])
    computed = daemon_of(embedded_parts).model.pairs_computed

    again = await stub.Prefetch(pb.PrefetchRequest(user_id="u", item_ids=["a", "b", "c"]))
    await batch_get_when_all_hit(stub, "u", ["a", "b", "c"])

    assert (again.queued, again.already_fresh) == (1, 2)
    assert daemon_of(embedded_parts).model.pairs_computed == computed + 1


async def test_the_daemon_itself_skips_pairs_made_fresh_after_they_were_queued(
    tiny_model: ExportReport,
) -> None:
    daemon = daemon_over(OnnxRunner(tiny_model.path))
    await daemon.process([PrefetchTask("u", ("a", "b"))])

    await daemon.process([PrefetchTask("u", ("a", "b", "c"))])

    assert daemon.model.pairs_computed == 3
    assert daemon.stats.pairs_already_fresh == 2


@pytest.fixture
def stub(embedded_stub: EmbeddingStoreStub) -> EmbeddingStoreStub:
    return embedded_stub


@pytest.fixture
def settings(settings: SidecarSettings) -> SidecarSettings:
    return settings.model_copy(update={"ttl_seconds": 0.5, "stale_seconds": 0})


async def test_an_expired_pair_is_a_miss_and_is_computed_again(
    embedded: Sidecar, embedded_parts: SidecarParts, stub: EmbeddingStoreStub
) -> None:
    await stub.Prefetch(pb.PrefetchRequest(user_id="u", item_ids=["a"]))
    await batch_get_when_all_hit(stub, "u", ["a"])
    await asyncio.sleep(0.6)

    expired = await stub.BatchGet(pb.BatchGetRequest(user_id="u", item_ids=["a"]))
    again = await stub.Prefetch(pb.PrefetchRequest(user_id="u", item_ids=["a"]))
    refreshed = await batch_get_when_all_hit(stub, "u", ["a"])

    assert list(expired.statuses) == [pb.MISS]
    assert again.queued == 1
    assert list(refreshed.statuses) == [pb.HIT]
    assert daemon_of(embedded_parts).model.pairs_computed == 2


class FailsOnItem:
    """The real runner, except that any batch holding `poison` raises, as a bad row would."""

    def __init__(self, runner: OnnxRunner, poison: str) -> None:
        self.runner = runner
        self.poison = poison
        self.model_version = runner.model_version
        self.calls = 0

    def compute(self, work: Sequence[UserWork]) -> np.ndarray:
        self.calls += 1
        if any(self.poison in w.item_ids for w in work):
            raise ValueError("index out of range")
        return self.runner.compute(work)


def daemon_over(model: OnnxRunner | FailsOnItem) -> PrecomputeDaemon:
    store = MemoryStore(1024**2, DIM)
    settings = PrecomputeSettings(batch_pairs=64)
    return PrecomputeDaemon(model, store, PrefetchQueue(100), settings, 60.0, 0.0)


async def test_a_poison_pair_is_dropped_and_its_batch_mates_are_stored(
    tiny_model: ExportReport,
) -> None:
    model = FailsOnItem(OnnxRunner(tiny_model.path), poison="bad")
    daemon = daemon_over(model)
    items = ("a", "b", "bad", "c", "d")

    await daemon.process([PrefetchTask("u", items), PrefetchTask("v", ("e",))])

    rows = await daemon.store.read("u", list(items), FLOAT32, time.time())
    statuses = rows.statuses(time.time()).tolist()
    assert statuses == [RowStatus.HIT, RowStatus.HIT, RowStatus.MISS, RowStatus.HIT, RowStatus.HIT]
    assert daemon.stats.poison_pairs_dropped == 1
    assert daemon.stats.pairs_computed == 5
    halvings_of_six_pairs = 3
    assert model.calls <= 1 + 2 * halvings_of_six_pairs


async def test_a_missed_read_is_computed_by_speculation_without_a_prefetch(
    embedded: Sidecar, stub: EmbeddingStoreStub
) -> None:
    first = await stub.BatchGet(pb.BatchGetRequest(user_id="u", item_ids=["m1", "m2"]))
    later = await batch_get_when_all_hit(stub, "u", ["m1", "m2"])
    assert list(first.statuses) == [pb.MISS, pb.MISS]
    assert list(later.statuses) == [pb.HIT, pb.HIT]


async def test_with_speculation_off_only_prefetch_work_is_computed(
    settings: SidecarSettings, precompute_settings: PrecomputeSettings
) -> None:
    sidecar = build_sidecar(settings, precompute_settings.model_copy(update={"speculation": ""}))
    await sidecar.start()
    try:
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            stub = EmbeddingStoreStub(channel)
            await stub.BatchGet(pb.BatchGetRequest(user_id="u", item_ids=["m1"]))
            await stub.Prefetch(pb.PrefetchRequest(user_id="u", item_ids=["p1"]))
            await batch_get_when_all_hit(stub, "u", ["p1"])  # the daemon has done its work
            answer = await stub.BatchGet(pb.BatchGetRequest(user_id="u", item_ids=["m1", "p1"]))
    finally:
        await sidecar.stop(grace=0)
    assert list(answer.statuses) == [pb.MISS, pb.HIT]


def test_the_embedded_speculator_knows_the_store_ttl(
    settings: SidecarSettings, precompute_settings: PrecomputeSettings
) -> None:
    longer = settings.model_copy(update={"ttl_seconds": 7200.0})
    source = daemon_of(sidecar_parts(longer, precompute_settings)).source

    assert isinstance(source, EmbeddedSpeculation)
    assert source.speculator.settings.ttl_seconds == 7200.0


def daemon_of(parts: SidecarParts) -> PrecomputeDaemon:
    assert parts.daemon is not None
    return parts.daemon


def test_a_history_book_keeps_to_its_bytes_and_lets_the_oldest_user_go_first() -> None:
    history = tuple(f"{i:0>250}" for i in range(256))
    one_user = history_size("user-0", history)
    book = HistoryBook(3 * one_user)
    for user in range(5):
        book.update(f"user-{user}", history)
        assert book.nbytes <= book.max_bytes
    assert (len(book), book.evicted_users) == (3, 2)
    assert book.get("user-0") == book.get("user-1") == ()
    assert book.get("user-4") == history
    assert one_user > 256 * 250  # the ids' own bytes, and more


def test_serve_keeps_prefetch_histories_within_history_bytes(tiny_model: ExportReport) -> None:
    """A real `solaris serve` and its daemon, given many users' longest histories: the
    histories it keeps stay within --history-bytes, the users let go counted in /metrics."""
    port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-m", "solaris.app.cli", "serve", "--port", str(port)]
    command += ["--model", str(tiny_model.path), "--dim", str(DIM), "--device", "cpu"]
    command += ["--metrics-port", str(metrics_port), "--history-bytes", "1Mi"]
    command += ["--speculation", "", "--grace-seconds", "0"]
    history = [f"{i:0>250}" for i in range(256)]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    with process, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        wait_until_serving(channel)
        stub = EmbeddingStoreStub(channel)
        for user in range(40):
            request = pb.PrefetchRequest(user_id=f"user-{user}", item_ids=["a"], history=history)
            stub.Prefetch(request, timeout=10)
        assert wait_until(lambda: scrape(metrics_port)["solaris_daemon_history_evicted_total"] > 0)
        samples = scrape(metrics_port)
        process.send_signal(signal.SIGTERM)
    assert 0 < samples["solaris_daemon_history_bytes"] <= 1024**2


class HeldOnFirstBatch:
    """The real runner, held on its first batch until released; it notes each batch's thread."""

    def __init__(self, runner: OnnxRunner) -> None:
        self.runner = runner
        self.model_version = runner.model_version
        self.entered = threading.Event()
        self.release = threading.Event()
        self.threads: list[str] = []

    def compute(self, work: Sequence[UserWork]) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        self.release.wait(30)
        return self.runner.compute(work)


async def test_a_stopped_daemon_leaves_its_next_batch_uncomputed(tiny_model: ExportReport) -> None:
    model = HeldOnFirstBatch(OnnxRunner(tiny_model.path))
    store, queue = MemoryStore(1024**2, DIM), PrefetchQueue(100)
    settings = PrecomputeSettings(batch_pairs=2, batch_wait_ms=0)
    daemon = PrecomputeDaemon(model, store, queue, settings, 60.0, 0.0)
    queue.put(PrefetchTask("u", ("a", "b", "c", "d")))
    daemon.start()
    assert model.entered.wait(30)

    daemon.stop(timeout=0.1)
    model.release.set()
    for thread in threading.enumerate():
        if thread.name == "solaris-precompute":
            thread.join(30)

    assert all(name.startswith("solaris-runner") for name in model.threads), model.threads
    assert daemon.stats.poison_pairs_dropped == 0
    rows = await store.read("u", ["a", "b", "c", "d"], FLOAT32, time.time())
    assert rows.statuses(time.time()).tolist().count(RowStatus.HIT) == 2


class CountedTakes(PrefetchQueue):
    """A Prefetch queue that records how many tasks each take asked for."""

    def __init__(self) -> None:
        super().__init__(1000)
        self.asked: list[int] = []

    def take(self, max_tasks: int, timeout: float | None = None) -> list[PrefetchTask]:
        self.asked.append(max_tasks)
        return super().take(max_tasks, timeout)


def test_a_batch_of_small_tasks_is_taken_in_two_takes_not_one_a_task() -> None:
    source = CountedTakes()
    for n in range(32):
        source.put(PrefetchTask(f"u{n}", tuple(f"i{k}" for k in range(8))))
    settings = PrecomputeSettings(batch_pairs=256, batch_wait_ms=10_000)
    daemon = PrecomputeDaemon(ZerosModel(), MemoryStore(1024**2, DIM), source, settings, 60, 0)

    daemon.start()
    try:
        wait_until(lambda: daemon.stats.batches == 1)
    finally:
        daemon.stop()

    assert daemon.stats.pairs_computed == 256
    assert source.asked[:2] == [1, 31]


class ZerosModel:
    model_version = "zeros"

    def compute(self, work: Sequence[UserWork]) -> np.ndarray:
        return np.zeros((sum(len(w.item_ids) for w in work), DIM), np.float32)
