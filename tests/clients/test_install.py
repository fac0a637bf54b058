"""The client installs light: a fresh venv holding only ./protos and ./clients (non-editable)
imports solaris.clients, answers a call to a port nobody serves with fallback rows, and has no
model stack, Redis or metrics library in it.

It builds a venv and runs pip (from its index or its cache), so it takes a while: deselect it
with `-m "not install"`.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.install

REPO = Path(__file__).resolve().parents[2]
HEAVY = {
    "torch",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnx",
    "onnxscript",
    "matplotlib",
    "redis",
    "prometheus-client",
}
"""What a ranking service must not get by installing the client."""

CALL_A_DEAD_PORT = """
import json, sys
from pathlib import Path
import solaris.clients
from solaris.clients import EmbeddingClient

with EmbeddingClient(sys.argv[1], dim=4, fallback=[1.0, 2.0, 3.0, 4.0], deadline=5) as client:
    answer = client.batch_get("u1", ["a", "b"])
try:
    import solaris.server
    server = True
except ModuleNotFoundError:
    server = False
package = Path(solaris.clients.__file__).parent
print(json.dumps({
    "package": str(package),
    "typed": (package / "py.typed").is_file(),
    "stubs_typed": (package.parent / "v1" / "embedding_store_pb2_grpc.pyi").is_file(),
    "server_importable": server,
    "status": answer.status.tolist(),
    "values": answer.values.tolist(),
    "reason": answer.fallback_reason.value,
}))
"""


@dataclass(frozen=True)
class ClientVenv:
    path: Path
    create_seconds: float
    install_seconds: float

    @property
    def python(self) -> str:
        return str(self.path / "bin" / "python")


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClientVenv]:
    """A fresh venv with ./protos and ./clients pip-installed, and how long that took. Removed
    afterwards: it is over 100 MB."""
    path = tmp_path_factory.mktemp("client") / "venv"
    started = time.monotonic()
    run(path.parent, sys.executable, "-m", "venv", str(path))
    created = time.monotonic()
    pip(path, "install", "--quiet", str(REPO / "protos"), str(REPO / "clients"))
    yield ClientVenv(path, created - started, time.monotonic() - created)
    shutil.rmtree(path)


def test_the_installed_client_falls_back_against_a_port_nobody_serves(
    client_venv: ClientVenv, tmp_path: Path
) -> None:
    script = tmp_path / "call.py"
    script.write_text(CALL_A_DEAD_PORT)
    # Bound but not listening: a connection is refused, and no one else can take the port.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        out = run(tmp_path, client_venv.python, str(script), f"127.0.0.1:{port}")
    answer = json.loads(out)

    assert Path(answer["package"]).is_relative_to(client_venv.path)
    assert answer["typed"]
    assert answer["stubs_typed"]
    assert not answer["server_importable"]
    assert answer["status"] == [4, 4]  # FALLBACK
    assert answer["values"] == [[1.0, 2.0, 3.0, 4.0]] * 2
    assert answer["reason"] == "unavailable"


def test_the_client_venv_holds_no_model_stack_redis_or_metrics(
    client_venv: ClientVenv, capsys: pytest.CaptureFixture[str]
) -> None:
    listed = json.loads(pip(client_venv.path, "list", "--format", "json"))
    names = {_canonical(package["name"]) for package in listed}
    size = int(run(client_venv.path, "du", "-sb", str(client_venv.path)).split()[0])
    with capsys.disabled():
        print(
            f"\nclient-only venv: {size / 1e6:.1f} MB (du -sb); python -m venv "
            f"{client_venv.create_seconds:.1f} s, pip install ./protos ./clients "
            f"{client_venv.install_seconds:.1f} s; {len(names)} distributions: "
            + ", ".join(sorted(names))
        )

    assert {"solaris-client", "solaris-protos", "grpcio", "protobuf", "numpy"} <= names
    assert not names & HEAVY


def pip(venv: Path, *args: str) -> str:
    python = str(venv / "bin" / "python")
    return run(venv, python, "-m", "pip", "--disable-pip-version-check", *args)


def run(cwd: Path, *command: str) -> str:
    """Runs a command in `cwd`, outside this test run's own import path; returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"
    return done.stdout


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")
