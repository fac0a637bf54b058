"""The precompute daemon's settings, read like the sidecar's: defaults, then `SOLARIS_*`
environment variables, then flags."""

import math
from dataclasses import dataclass
from pathlib import Path

from solaris.precompute.speculator import DEFAULT_WEIGHTS, Policy, SpeculationSettings
from solaris.server.settings import SettingsError, check_minimums, setting

DEFAULT_MODEL_DIR = "~/.cache/solaris/models"
DEFAULT_SPECULATION = ",".join(f"{policy}={weight:g}" for policy, weight in DEFAULT_WEIGHTS.items())


@dataclass(frozen=True)
class PrecomputeSettings:
    """Everything the precompute daemon can be told, in `solaris serve` and `solaris precompute`."""

    precompute: bool = setting(
        True, "Run the precompute daemon in this process (serve only; false to serve only)."
    )
    model: str = setting(
        "", "ONNX model file; empty for the reference model, exported on first use."
    )
    model_dir: str = setting(DEFAULT_MODEL_DIR, "Where the reference model is exported to.")
    device: str = setting("auto", "auto (CUDA when usable, else CPU), cuda or cpu.")
    runner_threads: int = setting(1, "Threads ONNX Runtime may use for one batch.", minimum=1)
    batch_pairs: int = setting(256, "Most pairs in one model batch.", minimum=1)
    batch_wait_ms: float = setting(
        5.0, "How long a batch waits to fill before it runs anyway.", minimum=0
    )
    speculation: str = setting(
        DEFAULT_SPECULATION,
        "Speculation policies, comma-separated, each with an optional =weight (a signal's "
        "value); empty: compute Prefetch work only, as it comes.",
    )
    speculation_budget: float = setting(
        1000.0, "Pairs per second the speculator may hand out.", minimum=1
    )
    speculation_decay_seconds: float = setting(
        60.0, "A signal's value falls by a factor of e every this many seconds.", minimum=1
    )
    speculator_shards: int = setting(
        1,
        "With --redis: users are split among this many shared speculators, each led by "
        "another daemon (at most the number of daemons; the same on every daemon); raise it "
        "when one cannot keep up.",
        minimum=1,
    )
    history_users: int = setting(
        100_000, "Users whose latest Prefetch history is kept, least recent dropped.", minimum=1
    )

    def __post_init__(self) -> None:
        check_minimums(self)
        if self.device not in ("auto", "cuda", "cpu"):
            raise SettingsError(f"device: must be auto, cuda or cpu, got {self.device!r}")
        parse_speculation(self.speculation)
        if self.model and not Path(self.model).expanduser().is_file():
            raise SettingsError(f"model: no file at {self.model}")

    @property
    def policies(self) -> frozenset[Policy]:
        return frozenset(parse_speculation(self.speculation))

    def speculation_settings(self) -> SpeculationSettings:
        named = parse_speculation(self.speculation)
        return SpeculationSettings(
            self.speculation_budget,
            frozenset(named),
            dict.fromkeys(Policy, 0.0) | named,
            decay_seconds=self.speculation_decay_seconds,
        )


def parse_speculation(text: str) -> dict[Policy, float]:
    """`prefetch=1,miss` -> each named policy with its weight (its default weight if none)."""
    known = {policy.value for policy in Policy}
    weights: dict[Policy, float] = {}
    for part in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = (piece.strip() for piece in part.partition("="))
        if name not in known:
            raise SettingsError(
                f"speculation: unknown policy {name!r}; known: {', '.join(sorted(known))}"
            )
        weights[Policy(name)] = _weight(name, weight) if weight else DEFAULT_WEIGHTS[Policy(name)]
    return weights


def _weight(name: str, text: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        weight = math.nan
    if not (math.isfinite(weight) and weight > 0):
        raise SettingsError(f"speculation: weight of {name} must be a number above 0, got {text!r}")
    return weight
