"""A sidecar that is alive but slow, or odd: a real gRPC server on a real socket whose BatchGet
and Prefetch sleep before answering, every row with the same status (MISS unless told). Run
as a module to get it in its own process, so a test can kill it mid-call:

    python -m tests.clients.faulty_sidecar --delay 10 --dim 8   # prints the port
"""

import argparse
import time
from concurrent import futures

import grpc

from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import (
    EmbeddingStoreServicer,
    add_EmbeddingStoreServicer_to_server,
)


class SlowServicer(EmbeddingStoreServicer):
    def __init__(self, delay: float, dim: int, status: int) -> None:
        self.delay = delay
        self.dim = dim
        self.status = status

    def BatchGet(
        self, request: pb.BatchGetRequest, context: grpc.ServicerContext
    ) -> pb.BatchGetResponse:
        time.sleep(self.delay)
        rows = len(request.item_ids)
        return pb.BatchGetResponse(
            dim=self.dim,
            dtype=pb.FLOAT32,
            embeddings=bytes(rows * self.dim * 4),
            statuses=[self.status] * rows,
            ages_ms=[0] * rows,
        )

    def Prefetch(
        self, request: pb.PrefetchRequest, context: grpc.ServicerContext
    ) -> pb.PrefetchResponse:
        time.sleep(self.delay)
        return pb.PrefetchResponse(queued=len(request.item_ids))


def start_slow_sidecar(
    delay: float, dim: int, port: int = 0, status: int = pb.MISS
) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    add_EmbeddingStoreServicer_to_server(SlowServicer(delay, dim, status), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, bound


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, required=True)
    parser.add_argument("--dim", type=int, required=True)
    args = parser.parse_args()
    server, port = start_slow_sidecar(args.delay, args.dim)
    print(port, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
