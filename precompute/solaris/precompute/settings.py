"""The precompute daemon's settings: the model, where it runs, its batches and the
speculator; and `solaris train`'s. A pydantic model like the store's (`solaris.server.settings`);
`solaris.app.settings` composes it into what `solaris serve` and `solaris precompute` read."""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from solaris.precompute.speculator import DEFAULT_WEIGHTS, Policy, SpeculationSettings
from solaris.server.settings import SettingsError, SettingsModel, Size

DEFAULT_MODEL_DIR = "~/.cache/solaris/models"
DEFAULT_SPECULATION = ",".join(f"{policy}={weight:g}" for policy, weight in DEFAULT_WEIGHTS.items())


@dataclass(frozen=True)
class TrainSettings:
    """What `solaris train` is told (here, apart from the training code, so that the CLI
    shows the defaults without importing the model stack)."""

    epochs: int = 1
    batch_size: int = 256
    learning_rate: float = 1e-3
    negatives: int = 4
    """Sampled negatives per positive while training."""
    held_out_share: float = 0.1
    eval_pairs: int = 2_000
    """Held-out pairs scored (a sample, so that evaluation stays short on a long log)."""
    eval_negatives: int = 100
    """Sampled negatives each held-out positive is ranked against."""
    recall_k: int = 10


class PrecomputeSettings(SettingsModel):
    """Everything the precompute daemon can be told, in `solaris serve` and `solaris precompute`."""

    model: str = Field(
        "", description="ONNX model file; empty for the reference model, exported on first use."
    )
    model_dir: str = Field(
        DEFAULT_MODEL_DIR, description="Where the reference model is exported to."
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto (CUDA when usable, else CPU), cuda or cpu."
    )
    runner_threads: int = Field(1, ge=1, description="Threads ONNX Runtime may use for one batch.")
    batch_pairs: int = Field(256, ge=1, description="Most pairs in one model batch.")
    batch_wait_ms: float = Field(
        5.0, ge=0, description="How long a batch waits to fill before it runs anyway."
    )
    speculation: str = Field(
        DEFAULT_SPECULATION,
        description="Speculation policies, comma-separated, each with an optional =weight (a "
        "signal's value); empty: compute Prefetch work only, as it comes.",
    )
    speculation_budget: float = Field(
        1000.0, ge=1, description="Pairs per second the speculator may hand out."
    )
    speculation_decay_seconds: float = Field(
        60.0, ge=1, description="A signal's value falls by a factor of e every this many seconds."
    )
    speculator_shards: int = Field(
        1,
        ge=1,
        description="With --redis: users are split among this many shared speculators, each led "
        "by another daemon (at most the number of daemons; the same on every daemon); raise it "
        "when one cannot keep up.",
    )
    history_bytes: Size = Field(
        64 * 1024**2,
        ge=1,
        description="Memory the users' latest Prefetch histories may take (suffixes as for "
        "cache-bytes), least recent user dropped first; the daemon and the speculator keep "
        "one such book each.",
    )

    @field_validator("model")
    @classmethod
    def _model_file_exists(cls, model: str) -> str:
        if model and not Path(model).expanduser().is_file():
            raise SettingsError(f"no file at {model}", "model")
        return model

    @field_validator("speculation")
    @classmethod
    def _speculation_parses(cls, speculation: str) -> str:
        parse_speculation(speculation)
        return speculation

    @property
    def policies(self) -> frozenset[Policy]:
        return frozenset(parse_speculation(self.speculation))

    def speculation_settings(self, ttl_seconds: float) -> SpeculationSettings:
        """The speculator's settings, for a store whose pairs are HIT for `ttl_seconds` (the
        return policy weighs a return before they go stale)."""
        named = parse_speculation(self.speculation)
        return SpeculationSettings(
            self.speculation_budget,
            frozenset(named),
            dict.fromkeys(Policy, 0.0) | named,
            decay_seconds=self.speculation_decay_seconds,
            ttl_seconds=ttl_seconds,
        )


def parse_speculation(text: str) -> dict[Policy, float]:
    """`prefetch=1,miss` -> each named policy with its weight (its default weight if none)."""
    known = {policy.value for policy in Policy}
    weights: dict[Policy, float] = {}
    for part in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = (piece.strip() for piece in part.partition("="))
        if name not in known:
            raise SettingsError(
                f"unknown policy {name!r}; known: {', '.join(sorted(known))}", "speculation"
            )
        weights[Policy(name)] = _weight(name, weight) if weight else DEFAULT_WEIGHTS[Policy(name)]
    return weights


def _weight(name: str, text: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        weight = math.nan
    if not (math.isfinite(weight) and weight > 0):
        raise SettingsError(
            f"the weight of {name} must be a number above 0, got {text!r}", "speculation"
        )
    return weight
