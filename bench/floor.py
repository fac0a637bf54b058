"""BatchGet against its floors: every contender in one run, interleaved (issue 14's table).

    .venv/bin/python bench/floor.py [--seconds 1.5] [--rounds 7] [--users 40] [--only 1,4,5]

Contenders, each in its own process: 500 items x 128 dims, float16 answers, one user a call,
every row a hit.
  1. floor: a bare grpc.aio server (the sidecar's grpc options) answering
     /solaris.v1.EmbeddingStore/BatchGet with the bytes of a warm solaris answer, built once
     (it parses each request, as any server must, and does nothing else);
  2. solaris serve-only, L1 warm (`build_sidecar(SidecarSettings(...))`, filled by
     `service.put`);
  3. solaris `serve` defaults (ServeSettings' defaults: the embedded daemon and speculator on
     the reference model in the default model_dir), L1 warm the same way, (a) with the daemon
     idle and (b) saturated: another process keeps Prefetch work for new pairs queued (a few
     batches ahead, so that it drains soon after) through each of this contender's windows;
  4. solaris --redis with L1 cold: its own redis-server holds `--users` users' rows (float16,
     the default), L1 (float16, as 2's) holds about six users (1 MiB), and the calls cycle
     through the users, so every row comes from Redis (redis_timeout_ms 1000, so that a slow
     read is timed, not turned into misses);
  5. the ranker's own redis-py + hiredis MGET of the same 500 keys (blocking client, the keys
     built and the values decoded each call): the floor for 4.

A round measures every contender in turn, the order rotating by one each round: `--seconds`
of back-to-back calls on one blocking channel (concurrency 1: p50 and p99 of those calls),
then `--seconds` of 16 calls in flight on one grpc.aio channel (16 threads for 5): calls/s.
The table gives the median of each figure over `--rounds` rounds, and each contender's ratio
to its floor with the issue's target: 2 to 1 (p50 and p99 at most 1.3x, calls/s at least
0.75x), 3 to 2 (p99 at most 1.5x), 4 to 5 (p50 at most 1.5x); and 4 against 1 + 5 (the
gRPC floor plus the MGET: 5 alone does no gRPC). It runs about 13 x --seconds
x --rounds seconds, plus half a minute to start (the defaults: under 3 minutes).

Below the table: the runner's pairs/s during 3's windows (what idle and saturated meant);
L1 bytes per pair (MemoryStore.nbytes / len, after 100,000 pairs written as serve-only stores
them); Redis bytes per pair (INFO used_memory grown by 4's fill / keys added); and the Redis
request stream's bytes per 500-item read (MEMORY USAGE of the stream / XLEN, and the median and
largest entry's fields) after 4's reads.
"""

import argparse
import asyncio
import contextlib
import itertools
import multiprocessing
import os
import statistics
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from typing import Any

import grpc
import numpy as np
import redis
from _common import calls_per_second, fill_redis, free_port, latencies, start_redis

from solaris.app.settings import ServeSettings
from solaris.precompute.settings import PrecomputeSettings
from solaris.server.redis_store import pair_key, value_layout
from solaris.server.request_stream import REQUEST_STREAM_KEY
from solaris.server.settings import SidecarSettings
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub

DIM = 128
ITEMS = [f"item-{n}" for n in range(500)]
RANKER = "user-1"
VERSION = "bench"
COLD_L1_BYTES = 1024**2
L1_PAIRS = 100_000
HISTORY = [f"seen-{n}" for n in range(64)]
FEED_AHEAD_USERS = 8
"""Prefetch users (64 pairs each) queued ahead of the saturated daemon: two batches of 256."""
SPAWN = multiprocessing.get_context("spawn")


def sidecar_grpc_options(limit: int) -> list[tuple[str, int]]:
    """The options solaris.server.sidecar.Sidecar gives its grpc.aio server."""
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


# ---- the servers, each in a process of its own ----


def run_floor(answer: bytes, ready: Connection) -> None:
    async def batch_get(request: pb.BatchGetRequest, context: object) -> bytes:
        return answer

    async def main() -> None:
        server = grpc.aio.server(options=sidecar_grpc_options(SidecarSettings().max_message_bytes))
        handler: grpc.RpcMethodHandler[pb.BatchGetRequest, bytes]
        handler = grpc.unary_unary_rpc_method_handler(
            batch_get, request_deserializer=pb.BatchGetRequest.FromString
        )
        service = grpc.method_handlers_generic_handler(
            "solaris.v1.EmbeddingStore", {"BatchGet": handler}
        )
        server.add_generic_rpc_handlers((service,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.send(port)
        await server.wait_for_termination()

    asyncio.run(main())


def run_sidecar(
    settings: SidecarSettings, precompute: PrecomputeSettings | None, ready: Connection
) -> None:
    """A sidecar built as `solaris serve` builds it, with the ranker's rows in L1 unless it
    reads from Redis."""
    from solaris.app.compose import build_sidecar

    async def main() -> None:
        sidecar = build_sidecar(settings, precompute)
        await sidecar.start()
        if not settings.redis:
            vectors = np.random.default_rng(0).standard_normal((len(ITEMS), DIM), np.float32)
            await sidecar.service.put(RANKER, ITEMS, vectors, VERSION)
        ready.send(sidecar.port)
        await asyncio.Event().wait()

    asyncio.run(main())


def feed(address: str, feeding: Event, drained: Event, ready: Connection) -> None:
    """While `feeding` is set, keeps FEED_AHEAD_USERS users of 64 new pairs queued by
    Prefetch; once it is cleared, waits for them to be computed and sets `drained`."""
    users = (f"load-{n}" for n in itertools.count())
    with grpc.insecure_channel(address) as channel:
        stub = EmbeddingStoreStub(channel)
        ready.send(computed(stub, [RANKER, *ITEMS]))
        while True:
            feeding.wait()
            ahead: deque[list[str]] = deque()
            while feeding.is_set() or ahead:
                while feeding.is_set() and len(ahead) < FEED_AHEAD_USERS:
                    ahead.append(prefetch(stub, next(users)))
                while ahead and computed(stub, ahead[0]):
                    ahead.popleft()
                time.sleep(0.02)
            drained.set()


def prefetch(stub: EmbeddingStoreStub, user: str) -> list[str]:
    items = [f"{user}-{n}" for n in range(64)]
    stub.Prefetch(pb.PrefetchRequest(user_id=user, item_ids=items, history=HISTORY), timeout=5)
    return [user, *items]


def computed(stub: EmbeddingStoreStub, user_and_items: list[str]) -> bool:
    user, *items = user_and_items
    answer = stub.BatchGet(pb.BatchGetRequest(user_id=user, item_ids=items), timeout=5)
    return pb.MISS not in answer.statuses


class Processes:
    """Child processes started with spawn, all ended when the block ends."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack

    def start(self, target: Callable[..., None], *args: object) -> Connection:
        """Starts `target(*args, send)`; the other end receives what it sends."""
        receive, send = SPAWN.Pipe(duplex=False)
        process = SPAWN.Process(target=target, args=(*args, send), daemon=True)
        process.start()
        self.stack.callback(process.join, 10)
        self.stack.callback(process.terminate)
        return receive


# ---- contenders and their measurement ----


@dataclass(frozen=True)
class Figures:
    p50_ms: float
    p99_ms: float
    calls_per_second: float


FIGURES = ("p50_ms", "p99_ms", "calls_per_second")


def _nothing() -> None:
    pass


@dataclass
class Contender:
    key: str
    """Its number in the table."""
    call: Callable[[int], object]
    """The n-th call at concurrency 1."""
    concurrent: Callable[[float], float]
    """Calls/s at concurrency 16 over that many seconds."""
    begin: Callable[[], None] = _nothing
    end: Callable[[], None] = _nothing
    rounds: list[Figures] = field(default_factory=list)

    def measure(self, seconds: float) -> None:
        self.begin()
        try:
            taken = latencies(self.call, seconds)
            rate = self.concurrent(seconds)
        finally:
            self.end()
        cuts = statistics.quantiles(taken, n=100)
        self.rounds.append(Figures(cuts[49] * 1e3, cuts[98] * 1e3, rate))

    def median(self) -> Figures:
        return Figures(
            *(statistics.median(getattr(f, name) for f in self.rounds) for name in FIGURES)
        )


def grpc_contender(
    key: str, address: str, requests: list[pb.BatchGetRequest], stack: contextlib.ExitStack
) -> Contender:
    """Calls `requests` in turn: on a blocking channel one at a time, on grpc.aio 16 at once."""
    stub = EmbeddingStoreStub(stack.enter_context(grpc.insecure_channel(address)))
    return Contender(
        key,
        lambda n: stub.BatchGet(requests[n % len(requests)], timeout=5),
        lambda seconds: asyncio.run(calls_per_second(address, requests, 16, seconds)),
    )


def mget_contender(url: str, users: int) -> Contender:
    client = redis.Redis.from_url(url)
    layout = value_layout(DIM)

    def call(n: int) -> np.ndarray:
        user = f"user-{n % users}"
        blobs: Any = client.mget([pair_key(VERSION, user, item) for item in ITEMS])
        return np.frombuffer(b"".join(blobs), layout)["values"]

    def concurrent(seconds: float) -> float:
        end, turns = time.perf_counter() + seconds, itertools.count()

        def worker() -> int:
            return len(latencies(lambda _: call(next(turns)), end - time.perf_counter()))

        start = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            done = sum(pool.map(lambda _: worker(), range(16)))
        return done / (time.perf_counter() - start)

    return Contender("5", call, concurrent)


@dataclass
class Runner:
    """A daemon sidecar's runner, watched through /metrics over its contender's windows."""

    metrics_port: int
    pairs: float = 0.0
    seconds: float = 0.0
    _started: tuple[float, float] = (0.0, 0.0)

    def begin(self) -> None:
        self._started = (self.computed(), time.perf_counter())

    def end(self) -> None:
        pairs, started = self._started
        self.pairs += self.computed() - pairs
        self.seconds += time.perf_counter() - started

    def computed(self) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as page:
            for line in page.read().decode().splitlines():
                if line.startswith("solaris_runner_pairs"):
                    return float(line.split()[1])
        raise RuntimeError("no solaris_runner_pairs in /metrics")


@dataclass
class Feeder:
    """Keeps a sidecar's Prefetch queue fed from another process while `feeding` is set."""

    feeding: Event
    drained: Event

    def begin(self) -> None:
        self.drained.clear()
        self.feeding.set()
        time.sleep(0.25)  # for the daemon to be at work when the timing starts

    def end(self) -> None:
        self.feeding.clear()
        if not self.drained.wait(60):
            raise RuntimeError("the saturated daemon did not drain its queue in 60 s")


def run_rounds(contenders: list[Contender], rounds: int, seconds: float) -> None:
    """Every contender once a round, the order rotated by one each round."""
    for start in range(rounds):
        for offset in range(len(contenders)):
            contenders[(start + offset) % len(contenders)].measure(seconds)


def warm_up(contenders: list[Contender]) -> None:
    for contender in contenders:
        latencies(contender.call, 0.5)
        contender.concurrent(0.5)


# ---- memory figures ----


def l1_bytes_per_pair() -> tuple[float, float]:
    """(MemoryStore.nbytes / len, mean id bytes) with L1_PAIRS pairs written as serve-only
    writes them: users of 500 items, through `service.put`."""
    from solaris.app.compose import sidecar_parts

    parts = sidecar_parts(SERVE_ONLY)
    service = parts.sidecar().service
    vectors = np.random.default_rng(0).standard_normal((len(ITEMS), DIM), np.float32)
    users = [f"user-{n:06d}" for n in range(L1_PAIRS // len(ITEMS))]

    async def fill() -> None:
        for user in users:
            await service.put(user, ITEMS, vectors, VERSION)

    asyncio.run(fill())
    id_bytes = len(users[0]) + statistics.mean(len(item) for item in ITEMS)
    return parts.l1.nbytes / len(parts.l1), id_bytes


def redis_fill_bytes_per_pair(url: str, users: int) -> float:
    """Fills Redis for contender 4; INFO used_memory grown / keys added."""
    client = redis.Redis.from_url(url)
    used, keys = client.info("memory")["used_memory"], client.dbsize()
    asyncio.run(fill_redis(url, users, ITEMS, DIM, VERSION))
    grown: int = client.info("memory")["used_memory"] - used
    return grown / (client.dbsize() - keys)


def request_stream_bytes(url: str) -> tuple[float, int, int, int]:
    """(MEMORY USAGE / XLEN, the median and the largest entry's field bytes, XLEN) of the
    request stream. The largest is a read that defines its ids (the first of a sidecar's
    epoch, every 30 s); the median names them by number."""
    client = redis.Redis.from_url(url)
    length = client.xlen(REQUEST_STREAM_KEY)
    usage = client.memory_usage(REQUEST_STREAM_KEY, samples=0) or 0
    found: Any = client.xrange(REQUEST_STREAM_KEY)
    sizes = sorted(
        sum(len(name) + len(value) for name, value in fields.items()) for _, fields in found
    )
    return usage / max(length, 1), statistics.median_low(sizes), sizes[-1], length


# ---- the run ----


@dataclass
class Servers:
    """Every contender's server, by name, and what the report needs of them."""

    address: dict[str, str]
    url: str
    idle: Runner
    saturated: Runner
    feeder: Feeder
    redis_bytes_per_pair: float


def requests_for(users: list[str]) -> list[pb.BatchGetRequest]:
    return [pb.BatchGetRequest(user_id=u, item_ids=ITEMS, dtype=pb.FLOAT16) for u in users]


def start_servers(stack: contextlib.ExitStack, users: int, only: frozenset[str]) -> Servers:
    """Redis (filled), the sidecars `only`'s contenders call (serve-only always: the floor
    answers its bytes), the floor, and the saturated daemon's feeder if 3b is run."""
    redis_server, url = start_redis()
    stack.callback(redis_server.wait)
    stack.callback(redis_server.terminate)
    redis_bytes = redis_fill_bytes_per_pair(url, users)
    children = Processes(stack)
    idle, saturated = Runner(free_port()), Runner(free_port())
    # `solaris serve` gives its ServeSettings to the sidecar and to the daemon both.
    idle_serve, saturated_serve = (serve_defaults(r.metrics_port) for r in (idle, saturated))
    wanted = {
        "serve-only": (SERVE_ONLY, None),
        "idle": (idle_serve, idle_serve) if "3a" in only else None,
        "saturated": (saturated_serve, saturated_serve) if "3b" in only else None,
        "cold": (cold_settings(url), None) if "4" in only else None,
    }
    ready = {name: children.start(run_sidecar, *given) for name, given in wanted.items() if given}
    address = {name: f"127.0.0.1:{pipe.recv()}" for name, pipe in ready.items()}
    floor = children.start(run_floor, warm_answer(address["serve-only"]))
    address["floor"] = f"127.0.0.1:{floor.recv()}"
    feeder = Feeder(SPAWN.Event(), SPAWN.Event())
    if "saturated" in address:
        children.start(feed, address["saturated"], feeder.feeding, feeder.drained).recv()
    return Servers(address, url, idle, saturated, feeder, redis_bytes)


SERVE_ONLY = SidecarSettings(port=0, dim=DIM, l1_dtype="float16")
"""Serve-only as a float16 ranker would run it: L1 kept in the dtype it is read in."""


def serve_defaults(metrics_port: int) -> ServeSettings:
    """`solaris serve`'s settings with nothing set but the ports: the sidecar's and, as
    `solaris serve` passes them, the daemon's."""
    return ServeSettings(port=0, metrics_port=metrics_port)


def cold_settings(url: str) -> SidecarSettings:
    """L1 in float16, as serve-only's: a float16 ranker's sidecar fills L1 from Redis's
    float16 values and answers from them with no conversion."""
    return SidecarSettings(
        port=0,
        dim=DIM,
        redis=url,
        cache_bytes=COLD_L1_BYTES,
        redis_timeout_ms=1000,
        l1_dtype="float16",
    )


def warm_answer(address: str) -> bytes:
    """The bytes of serve-only's answer to the ranker: what the floor answers every call."""
    with grpc.insecure_channel(address) as channel:
        answer = EmbeddingStoreStub(channel).BatchGet(requests_for([RANKER])[0], timeout=5)
    return answer.SerializeToString()


def check_answers(servers: Servers) -> None:
    """Every gRPC contender answers every row, the warm ones with the floor's embeddings."""
    floor = pb.BatchGetResponse.FromString(warm_answer(servers.address["serve-only"]))
    for name, address in servers.address.items():
        user = "user-0" if name == "cold" else RANKER
        with grpc.insecure_channel(address) as channel:
            answer = EmbeddingStoreStub(channel).BatchGet(requests_for([user])[0], timeout=5)
        if pb.MISS in answer.statuses or len(answer.statuses) != len(ITEMS):
            raise RuntimeError(f"{name} did not answer every row as a hit")
        if name != "cold" and answer.embeddings != floor.embeddings:
            raise RuntimeError(f"{name} answered other embeddings than the floor")


def contenders(
    servers: Servers, users: int, stack: contextlib.ExitStack, only: frozenset[str]
) -> list[Contender]:
    def on(name: str, key: str, requests: list[pb.BatchGetRequest]) -> Contender:
        return grpc_contender(key, servers.address[name], requests, stack)

    warm, cold = requests_for([RANKER]), requests_for([f"user-{n}" for n in range(users)])
    idle, saturated, feeder = servers.idle, servers.saturated, servers.feeder
    every: dict[str, Callable[[], Contender]] = {
        "1": lambda: on("floor", "1", warm),
        "2": lambda: on("serve-only", "2", warm),
        "3a": lambda: replace(on("idle", "3a", warm), begin=idle.begin, end=idle.end),
        "3b": lambda: replace(
            on("saturated", "3b", warm),
            begin=in_turn(feeder.begin, saturated.begin),
            end=in_turn(saturated.end, feeder.end),
        ),
        "4": lambda: on("cold", "4", cold),
        "5": lambda: mget_contender(servers.url, users),
    }
    return [make() for key, make in every.items() if key in only]


def in_turn(*steps: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        for step in steps:
            step()

    return run


def speculation_budget() -> float:
    return ServeSettings().speculation_budget


# ---- the report ----

NAMES = {
    "1": "bare grpc.aio server answering a pre-built identical BatchGetResponse",
    "2": "solaris float16, L1 warm, serve-only",
    "3a": "solaris float16, `solaris serve` defaults (embedded daemon + speculator), idle",
    "3b": "solaris float16, `solaris serve` defaults, daemon saturated",
    "4": "solaris `--redis`, L1 cold (every read from Redis)",
    "5": "the ranker's own redis-py + hiredis MGET of the same 500 keys",
}
# contender: (its floor, [(figure, target ratio)]); calls/s targets are "at least".
TARGETS = {
    "2": ("1", [("p50_ms", 1.3), ("p99_ms", 1.3), ("calls_per_second", 0.75)]),
    "3a": ("2", [("p99_ms", 1.5)]),
    "3b": ("2", [("p99_ms", 1.5)]),
    "4": ("5", [("p50_ms", 1.5)]),
}
SHORT = {"p50_ms": "p50", "p99_ms": "p99", "calls_per_second": "calls/s"}


def against_floor(key: str, medians: dict[str, Figures]) -> str:
    if key not in TARGETS:
        return "(a floor)"
    floor, targets = TARGETS[key]
    if floor not in medians:
        return f"({floor} not run)"
    cells = []
    for figure, target in targets:
        ratio = getattr(medians[key], figure) / getattr(medians[floor], figure)
        met = ratio >= target if figure == "calls_per_second" else ratio <= target
        bound = ">=" if figure == "calls_per_second" else "<="
        cells.append(
            f"{SHORT[figure]} {ratio:.2f}x ({bound}{target}: {'met' if met else 'MISSED'})"
        )
    return f"vs {floor}: " + ", ".join(cells)


def spread(contender: Contender, figure: str, digits: int) -> str:
    values = [getattr(f, figure) for f in contender.rounds]
    middle = statistics.median(values)
    return f"{middle:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def print_table(measured: list[Contender], rounds: int, seconds: float, load: float) -> None:
    medians = {c.key: c.median() for c in measured}
    print(f"BatchGet 500 items x {DIM} dims float16, one user a call: medians of {rounds}")
    print(f"interleaved rounds of {seconds:g} s per figure (the rounds' range in brackets);")
    print(f"{os.cpu_count()} CPUs, load average {load:.2f} when the run started")
    print()
    print("| contender | p50 ms | p99 ms | calls/s at 16 | against its floor |")
    print("| --- | --- | --- | --- | --- |")
    for c in sorted(measured, key=lambda c: c.key):
        cells = (spread(c, "p50_ms", 2), spread(c, "p99_ms", 2), spread(c, "calls_per_second", 0))
        print(f"| {c.key} {NAMES[c.key]} | {' | '.join(cells)} | {against_floor(c.key, medians)} |")
    if {"1", "4", "5"} <= set(medians):
        print()
        print(cold_against_both(medians))


def cold_against_both(medians: dict[str, Figures]) -> str:
    """4 against 5 alone is below what any gRPC answer costs (1): also against 1 + 5, what a
    sidecar doing nothing but the ranker's MGET behind the bare server would take."""
    cold, grpc_floor, mget = medians["4"], medians["1"], medians["5"]
    both = [getattr(grpc_floor, f) + getattr(mget, f) for f in ("p50_ms", "p99_ms")]
    return (
        f"4 against 1 + 5 (the gRPC floor plus the ranker's MGET): p50 {cold.p50_ms:.2f} ms vs "
        f"{both[0]:.2f} ({cold.p50_ms / both[0]:.2f}x), p99 {cold.p99_ms:.2f} ms vs {both[1]:.2f} "
        f"({cold.p99_ms / both[1]:.2f}x)"
    )


def print_figures(servers: Servers, l1: tuple[float, float], budget: float) -> None:
    idle, saturated = servers.idle, servers.saturated
    print()
    if idle.seconds and saturated.seconds:
        print(
            f"runner pairs/s in 3's windows: idle {idle.pairs / idle.seconds:,.0f}, saturated "
            f"{saturated.pairs / saturated.seconds:,.0f} ({FEED_AHEAD_USERS * 64} pairs kept "
            f"queued ahead; speculation budget {budget:g} pairs/s)"
        )
    per_pair, id_bytes = l1
    payload = DIM * 2
    print(
        f"L1: {per_pair:,.0f} B per pair (nbytes / len, {L1_PAIRS:,} pairs); payload "
        f"{payload} B float16 + {id_bytes:.0f} B of ids: {per_pair / (payload + id_bytes):.2f}x"
    )
    stored = value_layout(DIM).itemsize
    print(
        f"Redis: {servers.redis_bytes_per_pair:,.0f} B per pair (used_memory / keys); "
        f"value {stored} B (float16 and its header; bench/redis_bytes.py for 1M pairs)"
    )
    if "cold" not in servers.address:
        return
    per_read, median, largest, length = request_stream_bytes(servers.url)
    print(
        f"request stream: {per_read:,.0f} B per 500-item read (MEMORY USAGE / XLEN over "
        f"{length:,} entries); an entry's fields {median:,} B (median), {largest:,} B (the "
        "largest, defining its ids)"
    )


def at_least(low: float, kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: `kind(text)`, refused below `low`."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = low - 1
        if not value >= low:
            number = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r}: must be {number} of at least {low:g}")
        return value

    return parse


def contender_keys(text: str) -> frozenset[str]:
    """An argparse type: contenders' numbers, comma-separated, each one the table names."""
    keys = frozenset(key.strip() for key in text.split(","))
    if not keys or keys - set(NAMES):
        raise argparse.ArgumentTypeError(f"{text!r}: name contenders of {', '.join(NAMES)}")
    return keys


def main() -> None:
    load = os.getloadavg()[0]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=at_least(0.1, float), default=1.5, help="Seconds per figure a round."
    )
    parser.add_argument("--rounds", type=at_least(1, int), default=7)
    # Fewer users than L1 holds (about six of 500 float16 pairs) would read warm.
    parser.add_argument(
        "--users", type=at_least(10, int), default=40, help="Users 4 and 5 cycle through."
    )
    parser.add_argument(
        "--only",
        type=contender_keys,
        default=frozenset(NAMES),
        help="Contenders to run, comma-separated (such as 1,4,5); all by default.",
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        servers = start_servers(stack, args.users, args.only)
        check_answers(servers)
        measured = contenders(servers, args.users, stack, args.only)
        warm_up(measured)
        run_rounds(measured, args.rounds, args.seconds)
        print_table(measured, args.rounds, args.seconds, load)
        print_figures(servers, l1_bytes_per_pair(), speculation_budget())


if __name__ == "__main__":
    main()
