"""The production knobs against a real sidecar on a real socket: TLS and mutual TLS with
certificates made here by openssl, the shared token, reflection off, and /metrics served on
the event loop (no thread per connection), on the gRPC host by default."""

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from solaris.app.compose import sidecar_parts
from solaris.clients import AsyncEmbeddingClient, RowStatus, Tls
from solaris.server.settings import SidecarSettings
from solaris.server.sidecar import Sidecar
from solaris.v1 import embedding_store_pb2 as pb
from solaris.v1.embedding_store_pb2_grpc import EmbeddingStoreStub
from tests.clients.conftest import free_port
from tests.conftest import DIM
from tests.server.test_cli_errors import SERVE, refused, solaris
from tests.server.test_grpcurl import GRPCURL

TOKEN = "s3cret-token"
NAMED_HOST = "sidecar.solaris.test"
OPENSSL = shutil.which("openssl")


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate it signed for localhost and 127.0.0.1, one for a DNS name
    alone (NAMED_HOST), and a client's."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    named_cert: Path
    named_key: Path

    def client_tls(self, with_certificate: bool) -> Tls:
        if not with_certificate:
            return Tls(root_certificates=self.ca.read_bytes())
        return Tls(
            self.ca.read_bytes(), self.client_key.read_bytes(), self.client_cert.read_bytes()
        )


def openssl(*args: str, folder: Path) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], cwd=folder, check=True, capture_output=True)


def signed(name: str, subject: str, folder: Path, extensions: str = "") -> None:
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", *new_key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
            folder=folder)  # fmt: skip
    (folder / f"{name}.ext").write_text(extensions or "basicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "1", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
            folder=folder)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if OPENSSL is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("pki")
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *new_key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=solaris test CA", folder=folder)  # fmt: skip
    signed("server", "/CN=localhost", folder, "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    signed("client", "/CN=ranker", folder)
    signed("named", f"/CN={NAMED_HOST}", folder, f"subjectAltName=DNS:{NAMED_HOST}\n")
    return Pki(
        folder / "ca.pem",
        folder / "server.pem",
        folder / "server.key",
        folder / "client.pem",
        folder / "client.key",
        folder / "named.pem",
        folder / "named.key",
    )


@pytest.fixture
async def running(request: pytest.FixtureRequest, settings: SidecarSettings) -> AsyncIterator[Any]:
    """A sidecar factory: `await running(**settings)`, each stopped at the end."""
    started: list[Sidecar] = []

    async def start(**changes: Any) -> Sidecar:
        changed = SidecarSettings(**{**settings.model_dump(), **changes})
        sidecar = sidecar_parts(changed).sidecar()
        await sidecar.start()
        await sidecar.service.put("u", ["a"], np.ones((1, DIM), np.float32), "v1")
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        await sidecar.stop(grace=0)


async def read_status(sidecar: Sidecar, **client: Any) -> RowStatus:
    """The row status a client gets for the stored pair: HIT, or FALLBACK if refused."""
    async with AsyncEmbeddingClient(sidecar.address, DIM, deadline=5.0, **client) as reader:
        answer = await reader.batch_get("u", ["a"])
    return RowStatus(int(answer.status[0]))


async def test_tls_serves_a_client_trusting_the_ca_and_refuses_plaintext(
    running: Any, pki: Pki
) -> None:
    sidecar = await running(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))

    assert await read_status(sidecar, tls=pki.client_tls(False)) == RowStatus.HIT
    assert await read_status(sidecar) == RowStatus.FALLBACK


async def test_server_name_checks_a_certificate_that_does_not_name_the_target(
    running: Any, pki: Pki
) -> None:
    sidecar = await running(tls_cert=str(pki.named_cert), tls_key=str(pki.named_key))
    ca = pki.ca.read_bytes()
    assert await read_status(sidecar, tls=Tls(ca)) == RowStatus.FALLBACK
    assert await read_status(sidecar, tls=Tls(ca, server_name="elsewhere.test")) == (
        RowStatus.FALLBACK
    )
    assert await read_status(sidecar, tls=Tls(ca, server_name=NAMED_HOST)) == RowStatus.HIT


async def test_a_certificate_renewed_in_place_is_served_without_a_restart(
    running: Any, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    sidecar = await running(tls_cert=str(cert), tls_key=str(key))
    ca = pki.ca.read_bytes()
    named = Tls(ca, server_name=NAMED_HOST)
    assert await read_status(sidecar, tls=named) == RowStatus.FALLBACK

    key.write_bytes(pki.client_key.read_bytes())  # half a renewal: a key of another cert
    cert.write_bytes(pki.named_cert.read_bytes())
    assert await read_status(sidecar, tls=Tls(ca)) == RowStatus.HIT
    assert "kept the TLS files in use" in caplog.text

    key.write_bytes(pki.named_key.read_bytes())
    assert await read_status(sidecar, tls=named) == RowStatus.HIT
    assert await read_status(sidecar, tls=Tls(ca)) == RowStatus.FALLBACK


async def test_mutual_tls_refuses_a_client_without_a_certificate(running: Any, pki: Pki) -> None:
    sidecar = await running(
        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca)
    )

    assert await read_status(sidecar, tls=pki.client_tls(False)) == RowStatus.FALLBACK
    assert await read_status(sidecar, tls=pki.client_tls(True)) == RowStatus.HIT


async def test_the_token_is_wanted_by_every_call_but_health(running: Any) -> None:
    sidecar = await running(auth_token=TOKEN)
    request = pb.BatchGetRequest(user_id="u", item_ids=["a"])
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        stub = EmbeddingStoreStub(channel)
        for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.BatchGet(request, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert TOKEN not in (refused.value.details() or "")
        health = health_pb2_grpc.HealthStub(channel)
        checked = await health.Check(health_pb2.HealthCheckRequest())
        assert checked.status == health_pb2.HealthCheckResponse.SERVING

    assert await read_status(sidecar, token=TOKEN) == RowStatus.HIT
    assert await read_status(sidecar, token="wrong") == RowStatus.FALLBACK


@pytest.mark.parametrize(
    ("host", "tls", "warned"),
    [("0.0.0.0", False, True), ("127.0.0.1", False, False), ("0.0.0.0", True, False)],
)
async def test_a_token_sent_in_the_clear_off_loopback_is_warned_of(
    running: Any, pki: Pki, caplog: pytest.LogCaptureFixture, host: str, tls: bool, warned: bool
) -> None:
    certificate = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key)}
    await running(auth_token=TOKEN, host=host, **(certificate if tls else {}))

    assert ("auth_token is sent in the clear" in caplog.text) == warned
    assert TOKEN not in caplog.text


async def test_reflection_off_leaves_grpcurl_nothing_to_list(running: Any) -> None:
    sidecar = await running(reflection=False)
    process = await asyncio.create_subprocess_exec(
        GRPCURL, "-plaintext", sidecar.address, "list",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), timeout=60)

    assert process.returncode != 0
    assert b"reflection" in err.lower()
    assert await read_status(sidecar) == RowStatus.HIT


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


async def test_metrics_hold_no_thread_per_connection(running: Any) -> None:
    sidecar = await running(metrics_port=free_port())
    port = sidecar.metrics_port
    threads = threading.active_count()
    idle = []
    for _ in range(100):
        connection = socket.create_connection(("127.0.0.1", port))
        idle.append(connection)
    await asyncio.sleep(0.2)

    assert threading.active_count() <= threads + 1
    for connection in idle:
        connection.close()
    assert "solaris_calls_in_flight" in await asyncio.to_thread(scrape, port)


def test_metrics_listen_on_the_grpc_host_unless_told(settings: SidecarSettings) -> None:
    assert settings.served_metrics_host == settings.host
    on_pod_ip = SidecarSettings(**{**settings.model_dump(), "metrics_host": "10.0.0.7"})
    assert on_pod_ip.served_metrics_host == "10.0.0.7"


def test_bad_tls_and_reflection_flags_exit_2_with_one_line(pki: Pki, tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    openssl("pkey", "-in", str(pki.server_key), "-aes256", "-passout", "pass:secret",
            "-out", "encrypted.key", folder=tmp_path)  # fmt: skip
    cert, key = ["--tls-cert", str(pki.server_cert)], ["--tls-key", str(pki.server_key)]
    cases = [
        (["--tls-cert", str(tmp_path / "missing.pem"), *key], "tls_cert", "cannot read"),
        (["--tls-cert", str(not_pem), *key], "tls_cert", "no PEM block"),
        (cert, "tls_key", "tls-key"),
        ([*cert, "--tls-key", str(pki.client_key)], "tls_key", "not the private key"),
        ([*cert, "--tls-key", str(tmp_path / "encrypted.key")], "tls_key", "is encrypted"),
        ([*cert, *key, "--tls-client-ca", str(pki.server_key)], "tls_client_ca", "no CA"),
        (["--tls-client-ca", str(pki.ca)], "tls_client_ca", "needs tls-cert"),
        (["--reflection", "maybe"], "reflection", "true or false"),
        (["--health-port", "50051", "--port", "50051"], "health_port", "must differ"),
    ]
    for flags, setting, problem in cases:
        refused(solaris(*SERVE, *flags), f"{setting}:", problem)


def test_the_token_is_never_printed() -> None:
    env = {**os.environ, "SOLARIS_AUTH_TOKEN": TOKEN}
    shown = solaris(*SERVE, "--help", env=env)
    assert shown.returncode == 0
    assert TOKEN not in shown.stdout
    failed = solaris(*SERVE, "--auth-token", TOKEN, "--max-items", "0", env=env)
    assert failed.returncode == 2
    assert TOKEN not in failed.stderr


async def test_the_health_port_serves_health_alone_on_its_own_host(running: Any) -> None:
    """As in a pod: data on 127.0.0.1, health on another address (the Pod IP there)."""
    sidecar = await running(health_host="127.0.0.2", health_port=free_port())
    request = pb.BatchGetRequest(user_id="u", item_ids=["a"])
    async with grpc.aio.insecure_channel(f"127.0.0.2:{sidecar.port}") as elsewhere:
        with pytest.raises(grpc.aio.AioRpcError) as off_loopback:
            await EmbeddingStoreStub(elsewhere).BatchGet(request, timeout=2)
        assert off_loopback.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await read_status(sidecar) == RowStatus.HIT
    async with grpc.aio.insecure_channel(f"127.0.0.2:{sidecar.health_port}") as probe:
        health = health_pb2_grpc.HealthStub(probe)
        for service in ("", "solaris.v1.EmbeddingStore"):
            checked = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert checked.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as only_health:
            await EmbeddingStoreStub(probe).BatchGet(request)
        assert only_health.value.code() == grpc.StatusCode.UNIMPLEMENTED
        watch = health.Watch(health_pb2.HealthCheckRequest(service="solaris.v1.EmbeddingStore"))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

        stopping = asyncio.create_task(sidecar.stop(grace=1))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping
