"""`solaris export-model`: the reference model to ONNX, checked against PyTorch.

The file carries, as ONNX metadata, the table sizes its inputs were hashed with, so a runner
can hash ids the same way. Beside it, `<file>.version` holds the model version: a hash of the
file's bytes, the same one the runner computes when it loads the file.
"""

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from solaris.precompute.features import TableSizes
from solaris.precompute.model import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    ModelConfig,
    ReferenceModel,
    build_model,
)
from solaris.server.settings import SettingsError, check_writable

FLOAT32_TOLERANCE = 1e-4
logger = logging.getLogger("solaris.precompute")


class ExportCheckError(RuntimeError):
    """ONNX Runtime's output differs from PyTorch's by more than the tolerance."""


@dataclass(frozen=True)
class ExportReport:
    path: Path
    model_version: str
    max_abs_error: float


def model_version(path: Path) -> str:
    """The version a model file is served under: the start of its bytes' SHA-256."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def export_model(
    config: ModelConfig, path: Path, checkpoint: str | None = None, checks: int = 8
) -> ExportReport:
    """Writes the model to `path`, checks it on `checks` random batches, writes its version.

    Raises:
        ExportCheckError: the largest difference from PyTorch is above 1e-4.
        SettingsError: the checkpoint cannot be loaded into this model.
    """
    model = load_model(config, checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_onnx(model, path)
    error = max_abs_error(model, path, np.random.default_rng(config.seed), checks)
    if error > FLOAT32_TOLERANCE:
        raise ExportCheckError(
            f"{path}: ONNX Runtime differs from PyTorch by {error:.3g} (> {FLOAT32_TOLERANCE})"
        )
    version = model_version(path)
    Path(f"{path}.version").write_text(version + "\n")
    return ExportReport(path, version, error)


def load_model(config: ModelConfig, checkpoint: str | None = None) -> ReferenceModel:
    """The model, its weights from `config.seed` or from a state_dict file the user names.

    Raises:
        SettingsError: one line naming `checkpoint`, if that file cannot be loaded.
    """
    if checkpoint is None:
        return build_model(config)
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise SettingsError(f"no file at {checkpoint}", "checkpoint")
    try:
        return build_model(config, str(path))
    except Exception as error:  # torch.load and load_state_dict raise many kinds of error.
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        raise SettingsError(
            f"cannot load {checkpoint} as a state_dict (torch.save) of a model of dim "
            f"{config.dim}: {reason}",
            "checkpoint",
        ) from None


def _write_onnx(model: ReferenceModel, path: Path) -> None:
    users, history_len, pairs = (torch.export.Dim(n) for n in ("users", "history_len", "pairs"))
    dynamic = {
        "user": {0: users},
        "history": {0: users, 1: history_len},
        "history_length": {0: users},
        "candidate": {0: pairs},
        "candidate_user": {0: pairs},
    }
    sample = random_inputs(model.config, np.random.default_rng(0), users=2, pairs=3, history=5)
    torch_logger = logging.getLogger("torch")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                tuple(torch.from_numpy(sample[name]) for name in INPUT_NAMES),
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=dynamic,
                dynamo=True,
                verbose=False,
            )
            if program is None:
                raise ExportCheckError(f"{path}: torch.onnx.export made no program")
            program.save(str(path), external_data=False)
    finally:
        torch_logger.setLevel(level)
    _add_table_sizes(path, model.config)


def _add_table_sizes(path: Path, config: ModelConfig) -> None:
    proto = onnx.load(str(path))
    sizes = TableSizes(config.item_buckets, config.user_buckets, config.history_cap)
    for key, value in vars(sizes).items():
        proto.metadata_props.add(key=f"solaris.{key}", value=str(value))
    onnx.save(proto, str(path))


def random_inputs(
    config: ModelConfig, rng: np.random.Generator, users: int, pairs: int, history: int
) -> dict[str, np.ndarray]:
    """Inputs of the given sizes with random ids, history lengths and pair-to-user links."""
    return {
        "user": rng.integers(0, config.user_buckets, users),
        "history": rng.integers(1, config.item_buckets, (users, history)),
        "history_length": rng.integers(0, history + 1, users),
        "candidate": rng.integers(1, config.item_buckets, pairs),
        "candidate_user": rng.integers(0, users, pairs),
    }


def max_abs_error(
    model: ReferenceModel, path: Path, rng: np.random.Generator, checks: int
) -> float:
    """The largest |ONNX Runtime - PyTorch| over `checks` random batches of varied shapes."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for _ in range(checks):
        users = int(rng.integers(1, 6))
        history = int(rng.integers(0, model.config.history_cap + 1))
        inputs = random_inputs(model.config, rng, users, int(rng.integers(1, 40)), history)
        (served,) = session.run(None, inputs)
        with torch.no_grad():
            expected = model(*(torch.from_numpy(inputs[n]) for n in INPUT_NAMES)).numpy()
        worst = max(worst, float(np.abs(served - expected).max()))
    return worst


def reference_model(model_dir: str, config: ModelConfig | None = None) -> Path:
    """The reference model's file in `model_dir`, exported there on first use.

    The name carries a hash of the config, so a changed config exports a new file; the file
    appears under its name only once complete, so concurrent starts never read half a file.

    Raises:
        SettingsError: naming `model_dir`, if the file cannot be written there.
    """
    config = config or ModelConfig()
    config_hash = hashlib.sha256(repr(sorted(config.to_dict().items())).encode()).hexdigest()
    path = Path(model_dir).expanduser() / f"reference-{config_hash[:12]}.onnx"
    if path.is_file() and Path(f"{path}.version").is_file():
        return path
    check_writable(path, "model_dir")
    logger.info("exporting the reference model into %s (first use; takes a few seconds)", model_dir)
    report = _export_in_place(config, path)
    logger.info("exported %s: max abs error against PyTorch %.3g", path, report.max_abs_error)
    return path


def _export_in_place(config: ModelConfig, path: Path) -> ExportReport:
    """Exports to a temporary name beside `path`, then renames it (and its version file)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    report = export_model(config, partial)
    os.replace(f"{partial}.version", f"{path}.version")
    os.replace(partial, path)
    return report
