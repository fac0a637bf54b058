"""Export to ONNX, the numerical check, and refusing a model with the wrong signature."""

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from solaris.precompute.export import ExportReport, max_abs_error, model_version, reference_model
from solaris.precompute.model import ModelConfig, build_model
from solaris.precompute.runner import ModelContractError, OnnxRunner
from tests.conftest import TINY


def test_export_matches_pytorch_and_writes_its_version_beside_the_file(
    tiny_model: ExportReport,
) -> None:
    assert tiny_model.max_abs_error <= 1e-4
    version_file = Path(f"{tiny_model.path}.version")
    assert version_file.read_text().strip() == tiny_model.model_version
    assert model_version(tiny_model.path) == tiny_model.model_version


def test_the_numerical_check_catches_a_model_that_differs(tiny_model: ExportReport) -> None:
    other_weights = build_model(TINY.__class__(**{**TINY.to_dict(), "seed": 1}))

    error = max_abs_error(other_weights, tiny_model.path, np.random.default_rng(0), checks=2)

    assert error > 1e-2


def test_the_file_records_the_table_sizes_it_was_hashed_with(tiny_model: ExportReport) -> None:
    runner = OnnxRunner(tiny_model.path)

    assert (runner.sizes.item_buckets, runner.sizes.history_cap) == (1000, 8)
    assert runner.dim == TINY.dim
    assert runner.provider == "CPUExecutionProvider"


def wrong_model(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["features"], ["scores"])],
        "wrong",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, path)
    return path


def test_a_model_with_other_names_is_refused_with_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(ModelContractError) as refused:
        OnnxRunner(wrong_model(tmp_path / "wrong.onnx"))

    message = str(refused.value)
    for name in ("user", "history", "history_length", "candidate", "candidate_user", "embeddings"):
        assert name in message
    assert "features" in message


def test_serve_refuses_a_wrong_model_at_start(tmp_path: Path) -> None:
    path = wrong_model(tmp_path / "wrong.onnx")

    finished = subprocess.run(
        [sys.executable, "-m", "solaris.app.cli", "serve", "--port", "0", "--model", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert finished.returncode == 2
    assert "candidate_user" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_a_file_that_is_not_a_model_is_refused_naming_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"not a model")

    with pytest.raises(ModelContractError, match="model: cannot load"):
        OnnxRunner(path)


def test_the_reference_model_is_exported_on_first_use_then_reused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="solaris.precompute"):
        first = reference_model(str(tmp_path))
    exported_at = first.stat().st_mtime_ns
    logged = [record.getMessage() for record in caplog.records]
    assert not [message for message in logged if ".partial" in message]
    assert len([message for message in logged if str(first) in message]) == 1

    second = reference_model(str(tmp_path))

    assert second == first
    assert second.stat().st_mtime_ns == exported_at
    assert OnnxRunner(first).dim == ModelConfig().dim
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, f"{first.name}.version"]
