"""The rendered k8s/ overlays, as Python objects, and the containers' wiring read from them."""

import base64
import dataclasses
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).parents[2]
OVERLAYS = ("cpu", "gpu")
MEMORY_LIMIT_FOR_TESTS = "1073741824"
POD_IP_FOR_TESTS = "127.0.0.1"


def tool(name: str) -> str:
    """A tool installed beside this Python (the dev extras), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed: run make install"
    return found


@cache
def rendered(overlay: str) -> str:
    command = [tool("kubectl"), "kustomize", str(REPO / "k8s" / "overlays" / overlay)]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def objects(overlay: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered(overlay)) if doc]


def find(overlay: str, kind: str, name_prefix: str) -> dict[str, Any]:
    [found] = [
        obj
        for obj in objects(overlay)
        if obj["kind"] == kind and obj["metadata"]["name"].startswith(name_prefix)
    ]
    return found


@dataclasses.dataclass
class Container:
    name: str
    spec: dict[str, Any]
    env: dict[str, str]
    """Every environment variable, with envFrom and valueFrom resolved."""

    @property
    def argv(self) -> list[str]:
        return [*self.spec.get("command", []), *self.spec.get("args", [])]

    def port(self, name: str) -> int:
        [port] = [p["containerPort"] for p in self.spec["ports"] if p["name"] == name]
        return port


def containers(overlay: str, workload: str) -> dict[str, Container]:
    """The containers (init ones included) of a Deployment, by name."""
    pod = find(overlay, "Deployment", workload)["spec"]["template"]["spec"]
    every = [*pod.get("initContainers", []), *pod["containers"]]
    return {
        spec["name"]: Container(spec["name"], spec, environment(overlay, spec)) for spec in every
    }


def environment(overlay: str, spec: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        env.update(find(overlay, "ConfigMap", source["configMapRef"]["name"])["data"])
    for variable in spec.get("env", []):
        env[variable["name"]] = value_of(overlay, variable)
    return env


def value_of(overlay: str, variable: dict[str, Any]) -> str:
    if "value" in variable:
        return str(variable["value"])
    source = variable["valueFrom"]
    if "secretKeyRef" in source:
        ref = source["secretKeyRef"]
        data = find(overlay, "Secret", ref["name"])["data"][ref["key"]]
        return base64.b64decode(data).decode()
    if "resourceFieldRef" in source:
        return MEMORY_LIMIT_FOR_TESTS
    if source.get("fieldRef", {}).get("fieldPath") == "status.podIP":
        return POD_IP_FOR_TESTS
    raise AssertionError(f"unhandled valueFrom in {variable}")
