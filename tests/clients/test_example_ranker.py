"""The example ranking service, over HTTP, against a real sidecar."""

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest

from solaris.clients import EmbeddingClient
from tests.clients.conftest import ThreadedSidecar, load_example_ranker, vectors
from tests.conftest import DIM, wait_until

example = load_example_ranker()
Ranker, make_server = example.Ranker, example.make_server


@pytest.fixture
def ranker_url(threaded_sidecar: ThreadedSidecar) -> Iterator[tuple[str, Ranker]]:
    with EmbeddingClient(threaded_sidecar.address, DIM) as client:
        ranker = Ranker(client, DIM, deadline=2)
        server = make_server(ranker, port=0)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_port}/rank", ranker
        server.shutdown()
        server.server_close()


def post(url: str, payload: dict[str, object]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_candidates_come_back_ranked_by_their_stored_embeddings(
    threaded_sidecar: ThreadedSidecar, ranker_url: tuple[str, Ranker]
) -> None:
    url, ranker = ranker_url
    items = ["a", "b", "c", "d"]
    stored = vectors(3)
    threaded_sidecar.put("user", items[:3], stored)
    status, answer = post(url, {"user_id": "user", "item_ids": items})
    scores = np.append(stored @ ranker.head, 0.0)
    assert status == 200
    assert answer["ranked"] == [items[i] for i in np.argsort(-scores, kind="stable")]
    assert answer["from_store"] == 3
    assert answer["fallback_reason"] == "miss"
    assert wait_until(lambda: threaded_sidecar.queued_pairs() == 1)


def test_a_bad_request_is_a_400(ranker_url: tuple[str, Ranker]) -> None:
    status, answer = post(ranker_url[0], {"user_id": "", "item_ids": ["a"]})
    assert status == 400
    assert "user_id" in str(answer["error"])
