"""What callers that never read their answers cost `solaris serve --precompute false`.

Starts the sidecar as a real process (its defaults, plus any flags given after `--`), opens
`--calls` BatchGets of 4096 items (2 MiB answers at dim 128, float32) on one connection and
reads none of them; once each is either refused or answered-and-held (its headers arrived),
prints the process's RSS before and then, and how the calls ended.

    .venv/bin/python bench/stalled_readers.py [--calls 180] [-- --max-unsent-bytes 64Mi]
"""

import argparse
import asyncio
import subprocess
import sys
import time
from collections import Counter

import grpc
from _common import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc

from solaris.v1 import embedding_store_pb2 as pb

MiB = 1024**2
REQUEST = pb.BatchGetRequest(user_id="u", item_ids=[f"item-{i}" for i in range(4096)])
STALLED_OPTIONS = [("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", -1)]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def wait_serving(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(300):
            try:
                health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                return
            except grpc.RpcError:
                time.sleep(0.1)
    sys.exit("the sidecar never became healthy")


async def stall(port: int, calls: int) -> Counter[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=STALLED_OPTIONS) as channel:
        batch_get = channel.unary_stream(
            "/solaris.v1.EmbeddingStore/BatchGet",
            request_serializer=pb.BatchGetRequest.SerializeToString,
            response_deserializer=pb.BatchGetResponse.FromString,
        )
        opened = [batch_get(REQUEST) for _ in range(calls)]
        await asyncio.wait_for(asyncio.gather(*(c.initial_metadata() for c in opened)), 120)
        await asyncio.sleep(1)
        ended = Counter([(await call.code()).name for call in opened if call.done()])
        ended["held (not read)"] = sum(not call.done() for call in opened)
        return ended


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=180)
    parser.add_argument("flags", nargs="*", help="more flags for solaris serve, after --")
    args = parser.parse_args()
    port = free_port()
    command = [sys.executable, "-m", "solaris.app.cli", "serve", "--precompute", "false"]
    command += ["--port", str(port), "--grace-seconds", "0", *args.flags]
    with subprocess.Popen(command, stderr=subprocess.DEVNULL) as process:
        wait_serving(port)
        before = rss_mib(process.pid)
        ended = asyncio.run(stall(port, args.calls))
        print(f"{args.calls} stalled BatchGet(4096) on one connection, flags {args.flags}:")
        print(f"  RSS {before:.0f} MiB before, {rss_mib(process.pid):.0f} MiB stalled")
        print(f"  calls: {dict(ended)}")
        process.terminate()


if __name__ == "__main__":
    main()
