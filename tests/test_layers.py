"""The packages depend one way: clients and the bindings know nothing of the sidecar, the
sidecar nothing of the daemon, and only the composition root (`solaris.app`) knows both."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "solaris.clients": ROOT / "clients/solaris/clients",
    "solaris.wire": ROOT / "protos/solaris/wire",
    "solaris.server": ROOT / "server/solaris/server",
    "solaris.precompute": ROOT / "precompute/solaris/precompute",
    "solaris.app": ROOT / "server/solaris/app",
}
ALLOWED = {
    "solaris.clients": {"solaris.clients", "solaris.v1", "solaris.wire"},
    "solaris.wire": {"solaris.wire"},
    "solaris.server": {"solaris.server", "solaris.v1", "solaris.wire"},
    "solaris.precompute": {"solaris.precompute", "solaris.server", "solaris.v1", "solaris.wire"},
    "solaris.app": set(PACKAGES) | {"solaris.v1"},
}


def imported_packages(folder: Path) -> set[str]:
    """The `solaris.<package>` names that modules under `folder` import, anywhere in them."""
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            found |= {".".join(n.split(".")[:2]) for n in names if n.startswith("solaris.")}
    return found


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_a_package_imports_only_what_is_below_it(package: str) -> None:
    assert imported_packages(PACKAGES[package]) <= ALLOWED[package]


def test_the_check_sees_imports() -> None:
    assert "solaris.precompute" in imported_packages(PACKAGES["solaris.app"])
