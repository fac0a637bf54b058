"""A Redis credential is never printed, whatever form it takes: `user:password@` or a
`password` option in the URL, the URL from SOLARIS_REDIS, or SOLARIS_REDIS_PASSWORD. Real
`solaris serve` and `solaris precompute` processes against a redis-server that wants a
password; their logs, `--help`, /metrics and errors are searched for it."""

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
import redis

from solaris.precompute.export import ExportReport
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub
from tests.conftest import DIM, wait_until
from tests.server.serving import free_port, wait_until_serving

SECRET = "sekret9"
WRONG = "wrong8"
"""A password Redis refuses: printed nowhere either."""
REDIS_SERVER = shutil.which("redis-server")
SOLARIS = [sys.executable, "-m", "solaris.app.cli"]


@pytest.fixture
def guarded_redis() -> Iterator[int]:
    """A redis-server wanting SECRET: its port."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    command = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    process = subprocess.Popen([*command, "--requirepass", SECRET], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port, password=SECRET)
    assert wait_until(lambda: _answers(client), timeout=10)
    client.close()
    yield port
    process.kill()
    process.wait()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


def forms(port: int) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Each way to hand a sidecar the password: (flags, environment)."""
    plain = f"redis://127.0.0.1:{port}/0"
    return {
        "userinfo": (["--redis", f"redis://default:{SECRET}@127.0.0.1:{port}/0"], {}),
        "option": (["--redis", f"{plain}?password={SECRET}"], {}),
        "tls key option": (
            ["--redis", f"rediss://127.0.0.1:{port}/0?ssl_password={SECRET}&ssl_cert_reqs=none"],
            {},
        ),
        "url from env": ([], {"SOLARIS_REDIS": f"redis://:{SECRET}@127.0.0.1:{port}/0"}),
        "password env": (["--redis", plain], {"SOLARIS_REDIS_PASSWORD": SECRET}),
        "wrong password": (["--redis", plain], {"SOLARIS_REDIS_PASSWORD": WRONG}),
    }


FORMS = list(forms(0))


@pytest.mark.parametrize("form", FORMS)
def test_serve_prints_no_redis_credential(guarded_redis: int, form: str) -> None:
    """Logs, /metrics, a Prefetch's error (with the wrong password) and `--help`."""
    flags, env = forms(guarded_redis)[form]
    environ = {**os.environ, **env}
    port, metrics_port = free_port(), free_port()
    command = [*SOLARIS, "serve", "--precompute", "false", "--port", str(port), *flags]
    command += ["--metrics-port", str(metrics_port), "--grace-seconds", "0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=environ)
    with process, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        wait_until_serving(channel)
        printed = [_prefetch_error(EmbeddingStoreStub(channel))]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as answer:
            printed.append(answer.read().decode())
        process.send_signal(signal.SIGTERM)
        printed.append(process.communicate(timeout=20)[1])
    helped = subprocess.run(
        [*SOLARIS, "serve", "--help"], capture_output=True, text=True, env=environ
    )
    printed += [helped.stdout, helped.stderr]
    assert "solaris_redis_up" in printed[1]
    assert "shared store and work queue on " in printed[2]
    assert not [text for text in printed if SECRET in text or WRONG in text]


def _prefetch_error(stub: EmbeddingStoreStub) -> str:
    try:
        stub.Prefetch(pb.PrefetchRequest(user_id="u", item_ids=["a"]), timeout=5)
    except grpc.RpcError as error:
        return str(error)
    return ""


@pytest.mark.parametrize("form", FORMS)
def test_precompute_prints_no_redis_credential(
    guarded_redis: int, form: str, tiny_model: ExportReport
) -> None:
    flags, env = forms(guarded_redis)[form]
    environ = {**os.environ, **env}
    command = [*SOLARIS, "precompute", *flags, "--model", str(tiny_model.path)]
    command += ["--dim", str(DIM), "--device", "cpu"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=environ)
    with process:
        logs = _until_logged(process, "precomputing for")
        process.send_signal(signal.SIGTERM)
        logs += process.communicate(timeout=30)[1]
    helped = subprocess.run(
        [*SOLARIS, "precompute", "--help"], capture_output=True, text=True, env=environ
    )
    assert "precomputing for " in logs
    assert SECRET not in logs + helped.stdout + helped.stderr
    assert WRONG not in logs + helped.stdout + helped.stderr


def _until_logged(process: subprocess.Popen[str], line: str, timeout: float = 60) -> str:
    assert process.stderr is not None
    logs = ""
    give_up = time.monotonic() + timeout
    while line not in logs and time.monotonic() < give_up and process.poll() is None:
        logs += process.stderr.readline()
    return logs
