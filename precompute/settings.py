"""The precompute daemon's settings, read like the sidecar's: defaults, then `SOLARIS_*`
environment variables, then flags."""

from dataclasses import dataclass
from pathlib import Path

from solaris.precompute.speculator import Policy
from solaris.server.settings import SettingsError, check_minimums, setting

DEFAULT_MODEL_DIR = "~/.cache/solaris/models"


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
        "prefetch,miss,refresh,covisit,popular",
        "Speculation policies of the embedded daemon, comma-separated; empty: compute Prefetch "
        "work only, as it comes.",
    )
    speculation_budget: float = setting(
        1000.0, "Pairs per second the speculator may hand the embedded daemon.", minimum=1
    )
    history_users: int = setting(
        100_000, "Users whose latest Prefetch history is kept, least recent dropped.", minimum=1
    )

    def __post_init__(self) -> None:
        check_minimums(self)
        if self.device not in ("auto", "cuda", "cpu"):
            raise SettingsError(f"device: must be auto, cuda or cpu, got {self.device!r}")
        known = {policy.value for policy in Policy}
        for name in self._policy_names():
            if name not in known:
                raise SettingsError(
                    f"speculation: unknown policy {name!r}; known: {', '.join(sorted(known))}"
                )
        if self.model and not Path(self.model).expanduser().is_file():
            raise SettingsError(f"model: no file at {self.model}")

    @property
    def policies(self) -> frozenset[Policy]:
        return frozenset(Policy(name) for name in self._policy_names())

    def _policy_names(self) -> list[str]:
        return [name.strip() for name in self.speculation.split(",") if name.strip()]
