"""The runner: one ONNX Runtime session over a model file with the reference model's inputs.

The execution provider is CUDA when CUDA really works here (the package lists it even where
no GPU or driver exists, so a session is tried quietly), else the CPU; the choice is logged
once. On CUDA, inputs and output go through I/O binding.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime

from solaris.precompute.export import model_version, reference_model
from solaris.precompute.features import TableSizes, UserWork, model_inputs
from solaris.precompute.model import INPUT_NAMES, OUTPUT_NAMES, ModelConfig
from solaris.precompute.settings import PrecomputeSettings
from solaris.server.settings import SettingsError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cuda", "cpu")
_QUIET = 4
_ERRORS_ONLY = 3
logger = logging.getLogger("solaris.precompute")

EXPECTED_INPUTS = {name: ("tensor(int64)", 2 if name == "history" else 1) for name in INPUT_NAMES}
EXPECTED_OUTPUTS = {OUTPUT_NAMES[0]: ("tensor(float)", 2)}


class ModelContractError(SettingsError):
    """A model file whose inputs or outputs are not the ones the runner feeds and reads: the
    `model` setting names a file that cannot serve."""


class OnnxRunner:
    """Computes embeddings for batches of `UserWork`; safe to call from one thread at a time."""

    def __init__(self, path: Path, device: str = "auto", threads: int = 1) -> None:
        if device not in DEVICES:
            raise ValueError(f"device: {device!r} is not one of {', '.join(DEVICES)}")
        self.path = path
        try:
            self.session = _open_session(path, device, threads)
        except Exception as error:  # ONNX Runtime's errors share no base class but Exception.
            raise ModelContractError(f"model: cannot load {path}: {error}") from error
        self.provider = self.session.get_providers()[0]
        if device == "cuda" and self.provider != CUDA:
            raise SettingsError("device: cuda was asked for, but ONNX Runtime cannot use CUDA here")
        self.dim = check_contract(self.session, path)
        self.sizes = _table_sizes(self.session)
        self.model_version = model_version(path)
        self.pairs_computed = 0
        logger.info(
            "model %s (version %s, dim %d) on %s", path, self.model_version, self.dim, self.provider
        )

    def compute(self, work: Sequence[UserWork]) -> np.ndarray:
        """One (pairs, dim) float32 row per item, in `work` order."""
        embeddings = self.run(model_inputs(work, self.sizes))
        self.pairs_computed += len(embeddings)
        return embeddings

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if self.provider != CUDA:
            output: np.ndarray = self.session.run(list(OUTPUT_NAMES), inputs)[0]
            return output
        binding = self.session.io_binding()
        for name, array in inputs.items():
            binding.bind_ortvalue_input(
                name, onnxruntime.OrtValue.ortvalue_from_numpy(array, "cuda", 0)
            )
        binding.bind_output(OUTPUT_NAMES[0], "cuda")
        self.session.run_with_iobinding(binding)
        copied: np.ndarray = binding.copy_outputs_to_cpu()[0]
        return copied


def _open_session(path: Path, device: str, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    wants_cuda = device == "cuda" or (
        device == "auto" and CUDA in onnxruntime.get_available_providers()
    )
    if not wants_cuda:
        options.log_severity_level = _ERRORS_ONLY
        return onnxruntime.InferenceSession(str(path), options, providers=[CPU])
    quiet = device == "auto"
    options.log_severity_level = _QUIET if quiet else _ERRORS_ONLY
    # Loading the CUDA provider's libraries logs through the default logger, not the session's.
    onnxruntime.set_default_logger_severity(_QUIET if quiet else _ERRORS_ONLY)
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=[CUDA, CPU])
    finally:
        onnxruntime.set_default_logger_severity(_ERRORS_ONLY)


def check_contract(session: onnxruntime.InferenceSession, path: Path) -> int:
    """The model's output width, once its inputs and outputs are the expected ones."""
    found_inputs = {i.name: (i.type, len(i.shape)) for i in session.get_inputs()}
    found_outputs = {o.name: (o.type, len(o.shape)) for o in session.get_outputs()}
    if found_inputs != EXPECTED_INPUTS or found_outputs != EXPECTED_OUTPUTS:
        raise ModelContractError(
            f"{path}: the model must have inputs {_describe(EXPECTED_INPUTS)} and outputs "
            f"{_describe(EXPECTED_OUTPUTS)}; it has inputs {_describe(found_inputs)} and "
            f"outputs {_describe(found_outputs)}"
        )
    dim = session.get_outputs()[0].shape[1]
    if not isinstance(dim, int):
        raise ModelContractError(f"{path}: output {OUTPUT_NAMES[0]} needs a fixed width")
    return dim


def _describe(signature: dict[str, tuple[str, int]]) -> str:
    return ", ".join(f"{name} ({kind}, rank {rank})" for name, (kind, rank) in signature.items())


def _table_sizes(session: onnxruntime.InferenceSession) -> TableSizes:
    """Table sizes from the file's metadata; the reference model's defaults where absent."""
    metadata = session.get_modelmeta().custom_metadata_map
    defaults = ModelConfig()
    return TableSizes(
        *(
            int(metadata.get(f"solaris.{name}", getattr(defaults, name)))
            for name in ("item_buckets", "user_buckets", "history_cap")
        )
    )


def open_runner(settings: PrecomputeSettings) -> OnnxRunner:
    """The runner for the configured model, or for the reference model by default."""
    path = (
        Path(settings.model).expanduser() if settings.model else reference_model(settings.model_dir)
    )
    return OnnxRunner(path, settings.device, settings.runner_threads)
