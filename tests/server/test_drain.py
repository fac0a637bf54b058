"""`solaris serve` under load from 8 clients, sent SIGTERM: every call sent before it answers,
later ones are refused with UNAVAILABLE, none is CANCELLED, and it exits 0. A client told
UNAVAILABLE goes away (to another sidecar, in a real deployment)."""

import signal
import threading
from collections import Counter

import grpc

from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub
from tests.conftest import wait_until
from tests.server.serving import free_port, serving, wait_until_serving

CLIENTS = 8
REQUEST = pb.BatchGetRequest(user_id="u", item_ids=[f"item-{i}" for i in range(4096)])
Outcome = tuple[bool, grpc.StatusCode]
"""Whether the call was sent before SIGTERM, and how it ended."""


def load(
    port: int, running: threading.Event, signalled: threading.Event, out: list[Outcome]
) -> None:
    """BatchGet after BatchGet until refused."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = EmbeddingStoreStub(channel)
        while running.is_set():
            call = stub.BatchGet.future(REQUEST, timeout=30)
            sent_before = not signalled.is_set()
            try:
                call.result()
                code = grpc.StatusCode.OK
            except grpc.RpcError:
                code = call.code()
            out.append((sent_before, code))
            if code != grpc.StatusCode.OK:
                return


def test_sigterm_under_load_answers_calls_in_flight_and_cancels_none() -> None:
    port = free_port()
    outcomes: list[Outcome] = []
    running, signalled = threading.Event(), threading.Event()
    running.set()
    with serving(["--port", str(port), "--grace-seconds", "6"]) as process:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_until_serving(channel)
        clients = [
            threading.Thread(target=load, args=(port, running, signalled, outcomes))
            for _ in range(CLIENTS)
        ]
        for client in clients:
            client.start()
        assert wait_until(lambda: len(outcomes) >= 2 * CLIENTS, timeout=60)

        signalled.set()
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=30)
        running.clear()
        for client in clients:
            client.join(timeout=60)

        told = process.stderr.read() if process.stderr else ""
    codes = Counter(code for _, code in outcomes)
    assert codes[grpc.StatusCode.CANCELLED] == 0, (codes, told)
    sent_before = {code for before, code in outcomes if before}
    assert sent_before == {grpc.StatusCode.OK}, codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert exit_code == 0
