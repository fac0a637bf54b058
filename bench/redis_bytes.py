"""Redis memory per stored pair, for each value layout, in one run.

    .venv/bin/python bench/redis_bytes.py [--pairs 1000000] [--dim 128]

For each layout (the legacy float32 one, with its 31-byte header and the model version, that
sidecars before the compact layout wrote; compact float32; compact float16, the default), a
redis-server of its own on a free port takes `--pairs` pairs (users of 500 items, keys as the
sidecar builds them, each SET with a TTL as a daemon writes it), and the script prints INFO
memory's used_memory grown / keys added, beside the value's own bytes. Then the default layout
on a Redis Cluster of 3 masters and 3 replicas: the masters' used_memory grown / keys (a
replica holds as much again).
"""

import argparse
import socket
import tempfile
import time
from collections.abc import Callable, Iterator

import hiredis
import numpy as np
import redis
import redis.cluster
from _common import start_cluster, start_redis

from solaris.server.redis_store import encode_values, legacy_layout, user_key_prefix
from solaris.server.store import FLOAT16, FLOAT32, Freshness

ITEMS = [f"item-{n}" for n in range(500)]
VERSION = "bench"
TTL_MS = 3_600_000
Encoder = Callable[[np.ndarray, Freshness], list[bytes]]


def legacy_values(vectors: np.ndarray, freshness: Freshness) -> list[bytes]:
    """Values as written before the compact layout (format 1, dtype 1, the dim, the version)."""
    records = np.zeros(len(vectors), legacy_layout(vectors.shape[1], freshness.model_version))
    records["format"] = records["dtype"] = 1
    records["dim"] = vectors.shape[1]
    records["times"] = np.array(tuple(freshness[1:]), records.dtype["times"])
    records["version_length"] = len(freshness.model_version)
    records["model_version"] = freshness.model_version.encode()
    records["values"] = vectors
    return [record.tobytes() for record in records]


LAYOUTS: dict[str, Encoder] = {
    "legacy float32 (before)": legacy_values,
    "compact float32": lambda vectors, freshness: encode_values(vectors, freshness, FLOAT32),
    "compact float16 (default)": lambda vectors, freshness: encode_values(
        vectors, freshness, FLOAT16
    ),
}


def user_pairs(pairs: int, dim: int, encode: Encoder) -> Iterator[list[tuple[str, bytes]]]:
    """One user's (key, value) at a time, 500 a user, `pairs` in all."""
    freshness = Freshness.starting(VERSION, time.time(), 3600, 600)
    vectors = np.random.default_rng(0).standard_normal((len(ITEMS), dim)).astype(np.float32)
    blobs = encode(vectors, freshness)
    for user in range(-(-pairs // len(ITEMS))):
        prefix = user_key_prefix(VERSION, f"user-{user:07d}")
        count = min(len(ITEMS), pairs - user * len(ITEMS))
        yield [(prefix + item, blob) for item, blob in zip(ITEMS, blobs[:count], strict=False)]


def commands(pairs: int, dim: int, encode: Encoder) -> Iterator[tuple[int, bytes]]:
    """One user's SETs at a time: how many, and the commands packed."""
    for batch in user_pairs(pairs, dim, encode):
        packed = (hiredis.pack_command(("SET", key, blob, "PX", TTL_MS)) for key, blob in batch)
        yield len(batch), b"".join(packed)


def fill(port: int, batches: Iterator[tuple[int, bytes]]) -> None:
    """Sends each batch and reads its replies before the next (so nothing piles up)."""
    reader = hiredis.Reader()
    with socket.create_connection(("127.0.0.1", port)) as connection:
        for expected, batch in batches:
            connection.sendall(batch)
            replies = 0
            while replies < expected:
                reader.feed(connection.recv(1 << 16))
                while (reply := reader.gets()) is not False:
                    if isinstance(reply, hiredis.ReplyError):
                        raise reply
                    replies += 1


def bytes_per_pair(pairs: int, dim: int, encode: Encoder) -> tuple[float, int]:
    """(used_memory grown / keys, one value's bytes) on a redis-server of its own."""
    process, url = start_redis()
    try:
        client = redis.Redis.from_url(url)
        before = client.info("memory")["used_memory"]
        fill(int(url.rsplit(":", 1)[1].split("/")[0]), commands(pairs, dim, encode))
        grown: int = client.info("memory")["used_memory"] - before
        keys = client.dbsize()
        freshness = Freshness.starting(VERSION, 0.0, 1, 1)
        value = len(encode(np.zeros((1, dim), np.float32), freshness)[0])
        return grown / keys, value
    finally:
        process.kill()
        process.wait()


def cluster_bytes_per_pair(pairs: int, dim: int, encode: Encoder) -> float:
    """used_memory grown / keys over the masters of a 3+3 cluster of its own."""
    with tempfile.TemporaryDirectory() as folder:
        processes, url = start_cluster(folder)
        try:
            client = redis.cluster.RedisCluster.from_url(url.replace("+cluster", ""))
            masters = client.get_primaries()

            def used() -> int:
                return sum(
                    client.info("memory", target_nodes=node)["used_memory"] for node in masters
                )

            before = used()
            for batch in user_pairs(pairs, dim, encode):
                pipe = client.pipeline(transaction=False)
                for key, blob in batch:
                    pipe.set(key, blob, px=TTL_MS)
                pipe.execute()
            keys = sum(client.dbsize(target_nodes=node) for node in masters)
            return (used() - before) / keys
        finally:
            for process in processes:
                process.kill()
                process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    key = len(user_key_prefix(VERSION, "user-0000000") + ITEMS[-1])
    print(f"{args.pairs:,} pairs of {args.dim} dims, keys of up to {key} bytes, TTL set")
    print("| layout | value bytes | Redis bytes per pair (used_memory / keys) |")
    print("| --- | --- | --- |")
    for name, encode in LAYOUTS.items():
        per_pair, value = bytes_per_pair(args.pairs, args.dim, encode)
        print(f"| {name} | {value} | {per_pair:,.0f} |")
    default = LAYOUTS["compact float16 (default)"]
    per_pair = cluster_bytes_per_pair(args.pairs, args.dim, default)
    print(f"| compact float16, 3-master cluster (each replica as much again) | | {per_pair:,.0f} |")


if __name__ == "__main__":
    main()
