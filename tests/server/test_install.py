"""The sidecar installs without the model stack, as its image does: a fresh venv holding only
./protos, ./clients and . (non-editable) has no PyTorch, ONNX or ONNX Runtime, serves with
--precompute false, and refuses to start a daemon with one line that says what to install.

It builds a venv and runs pip (from its index or its cache): deselect it with `-m "not install"`.
"""

import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.clients.test_install import REPO, _canonical, pip, run
from tests.server.serving import free_port, wait_until_serving

pytestmark = pytest.mark.install

MODEL_STACK = {"torch", "onnxruntime", "onnxruntime-gpu", "onnx", "onnxscript", "matplotlib"}


@pytest.fixture(scope="module")
def sidecar_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("sidecar") / "venv"
    run(path.parent, sys.executable, "-m", "venv", str(path))
    pip(path, "install", "--quiet", *(str(REPO / part) for part in ("protos", "clients", ".")))
    yield path
    shutil.rmtree(path)


def test_the_sidecar_venv_holds_no_model_stack(sidecar_venv: Path) -> None:
    listed = subprocess.run(
        [str(sidecar_venv / "bin/python"), "-m", "pip", "list", "--format", "freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = {_canonical(line.split("==")[0]) for line in listed.splitlines()}
    assert {"solaris-embeddings", "solaris-protos", "grpcio", "redis"} <= names
    assert not names & MODEL_STACK


def test_the_installed_sidecar_serves_only(sidecar_venv: Path, tmp_path: Path) -> None:
    port = free_port()
    command = [str(sidecar_venv / "bin/solaris"), "serve", "--precompute", "false"]
    process = subprocess.Popen([*command, "--port", str(port)], cwd=tmp_path)
    with process, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        wait_until_serving(channel)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0


def test_without_the_model_stack_a_daemon_is_refused_in_one_line(
    sidecar_venv: Path, tmp_path: Path
) -> None:
    done = subprocess.run(
        [str(sidecar_venv / "bin/solaris"), "serve", "--port", str(free_port())],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "precompute: the model stack is not installed" in line
    assert "solaris-embeddings[model]" in line
