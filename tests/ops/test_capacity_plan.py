"""docs/capacity_plan.py: its arithmetic, and docs/capacity.md's worked example is its output."""

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).parents[2]
SCRIPT = REPO / "docs" / "capacity_plan.py"


def planner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("capacity_plan", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["capacity_plan"] = module
    spec.loader.exec_module(module)
    return module


def test_the_worked_example_is_the_script_output() -> None:
    printed = subprocess.run(
        [sys.executable, str(SCRIPT)], check=True, capture_output=True, text=True
    ).stdout
    document = (REPO / "docs" / "capacity.md").read_text()
    assert f"```\n{printed}```" in document


def test_memory_follows_ttl_and_daemons_follow_their_speed() -> None:
    capacity_plan = planner()
    fleet = capacity_plan._parser().parse_args([])
    base = capacity_plan.Fleet(**vars(fleet))
    longer = dataclasses.replace(base, ttl_seconds=2 * base.ttl_seconds)
    faster = dataclasses.replace(base, daemon_pairs_per_second=100 * base.daemon_pairs_per_second)

    def figure(fleet: object, name: str) -> float:
        [value] = [line.value for line in capacity_plan.plan(fleet) if line.name == name]
        return float(value)

    assert figure(longer, "Redis memory") == 2 * figure(base, "Redis memory")
    assert figure(faster, "daemons") < figure(base, "daemons") / 50
    assert figure(longer, "pairs computed") == figure(base, "pairs computed")
