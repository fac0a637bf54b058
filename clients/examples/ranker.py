"""A tiny ranking service that scores candidates with embeddings from the solaris sidecar.

    python clients/examples/ranker.py --sidecar 127.0.0.1:50051 --port 8080
    curl -s localhost:8080/rank -d '{"user_id": "u1", "item_ids": ["a", "b", "c"]}'

It asks the sidecar for each candidate's embedding within a 20 ms budget, scores them with a
linear head, and answers with the candidates best first. Rows the sidecar could not serve get
the fallback (zeros here, so they score 0) and are prefetched for next time. The ranker never
fails because of the sidecar: the worst case is an answer ranked by the fallback alone.
"""

import argparse
import json
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from solaris.clients import EmbeddingClient


class Ranker:
    def __init__(self, client: EmbeddingClient, dim: int, deadline: float) -> None:
        self.client = client
        self.deadline = deadline
        self.head = np.random.default_rng(7).standard_normal(dim).astype(np.float32)

    def rank(self, user_id: str, item_ids: list[str]) -> dict[str, object]:
        answer = self.client.batch_get(
            user_id, item_ids, deadline=self.deadline, prefetch_misses=True
        )
        scores = answer.values @ self.head
        order = np.argsort(-scores, kind="stable")
        reason = answer.fallback_reason
        return {
            "ranked": [item_ids[i] for i in order],
            "scores": [float(scores[i]) for i in order],
            "from_store": int(answer.served.sum()),
            "fallback_reason": reason.value if reason else None,
        }


def make_server(ranker: Ranker, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            try:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                answer = ranker.rank(body["user_id"], body["item_ids"])
            except (KeyError, TypeError, ValueError) as error:
                self._reply(400, {"error": str(error)})
            else:
                self._reply(200, answer)

        def _reply(self, code: int, payload: dict[str, object]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return ThreadingHTTPServer((host, port), Handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="A tiny ranker that uses the solaris sidecar.")
    parser.add_argument("--sidecar", default="127.0.0.1:50051")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--deadline-ms", type=float, default=20.0)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    with EmbeddingClient(args.sidecar, args.dim) as client:
        ranker = Ranker(client, args.dim, args.deadline_ms / 1000)
        server = make_server(ranker, args.port, args.host)
        # In a container this is PID 1, which ignores SIGTERM unless it handles it.
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
        print(f"ranking on http://{args.host}:{server.server_port}/rank", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
