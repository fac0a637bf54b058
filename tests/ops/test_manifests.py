"""The k8s/ overlays render, validate against the Kubernetes schemas, and say only what the
CLI accepts: a renamed flag or setting, or a probe on the wrong port, fails here."""

import subprocess
from pathlib import Path

import pytest

from solaris.app.cli import build_parser
from solaris.app.settings import (
    COMMANDS,
    ENV_PREFIX,
    EVERY_SETTING,
    OTHER_VARIABLES,
    DaemonSettings,
    ServeSettings,
    load,
)
from solaris.server.sidecar import SERVICE_NAME
from tests.clients.conftest import load_example_ranker
from tests.ops.manifests import OVERLAYS, Container, containers, find, objects, rendered, tool


def known_env() -> set[str]:
    return {ENV_PREFIX + name.upper() for name in EVERY_SETTING} | OTHER_VARIABLES


def solaris_containers(overlay: str) -> list[Container]:
    found = []
    for workload in ("ranker", "solaris-precompute"):
        found += [c for c in containers(overlay, workload).values() if c.argv[0] == "solaris"]
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_validates_against_the_kubernetes_schemas(overlay: str, tmp_path: Path) -> None:
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(rendered(overlay))
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", str(manifest)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_commands_and_environment_are_what_the_cli_accepts(overlay: str) -> None:
    for container in solaris_containers(overlay):
        args = build_parser().parse_args(container.argv[1:])
        unknown = {name for name in container.env if name.startswith(ENV_PREFIX)} - known_env()
        assert not unknown, f"{container.name}: settings the CLI does not know: {unknown}"
        load(COMMANDS[args.command], args, container.env)
        assert container.env.get("SOLARIS_LOG_FORMAT", "text") in ("text", "json")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_pod_gets_service_link_variables(overlay: str) -> None:
    """Kubernetes gives every pod `<SERVICE>_PORT=tcp://...` for each Service unless told not
    to: a Service named `solaris` would set SOLARIS_PORT, which the sidecar reads."""
    pods = [obj for obj in objects(overlay) if obj["kind"] in ("Deployment", "StatefulSet")]
    assert pods
    for pod in pods:
        assert pod["spec"]["template"]["spec"].get("enableServiceLinks") is False, pod["metadata"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_ports_match_the_settings(overlay: str) -> None:
    pod = containers(overlay, "ranker")
    sidecar = pod["solaris-sidecar"]
    assert sidecar.spec["restartPolicy"] == "Always"
    settings = load(ServeSettings, environ=sidecar.env)
    assert settings.host == "127.0.0.1"
    assert not settings.reflection
    assert from_pod_ip(sidecar) == {"SOLARIS_HEALTH_HOST", "SOLARIS_METRICS_HOST"}
    assert sidecar.port("health") == settings.health_port
    assert sidecar.port("metrics") == settings.metrics_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = sidecar.spec[probe]["grpc"]
        assert grpc_probe["port"] == settings.health_port, probe
        assert grpc_probe.get("service", "") in ("", SERVICE_NAME), probe
    ranker_args = load_example_ranker().build_parser().parse_args(pod["ranker"].argv[2:])
    assert ranker_args.sidecar == f"127.0.0.1:{settings.port}"
    assert ranker_args.dim == settings.dim
    daemon = containers(overlay, "solaris-precompute")["precompute"]
    daemon_settings = load(DaemonSettings, environ=daemon.env)
    assert daemon.spec["livenessProbe"]["httpGet"]["port"] == daemon_settings.metrics_port
    assert from_pod_ip(daemon) == {"SOLARIS_METRICS_HOST"}


def from_pod_ip(container: Container) -> set[str]:
    """The container's variables the downward API sets to the Pod IP."""
    return {
        variable["name"]
        for variable in container.spec["env"]
        if variable.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP"
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_sidecar_drains_within_the_pods_grace_period(overlay: str) -> None:
    pod = containers(overlay, "ranker")
    settings = load(ServeSettings, environ=pod["solaris-sidecar"].env)
    grace = find(overlay, "Deployment", "ranker")["spec"]["template"]["spec"]
    assert settings.grace_seconds < grace["terminationGracePeriodSeconds"]


def test_only_the_gpu_overlay_asks_for_a_gpu() -> None:
    for overlay, wanted in (("cpu", None), ("gpu", 1)):
        daemon = containers(overlay, "solaris-precompute")["precompute"]
        assert daemon.spec["resources"]["limits"].get("nvidia.com/gpu") == wanted
        assert daemon.env["SOLARIS_DEVICE"] == overlay.replace("gpu", "cuda")
