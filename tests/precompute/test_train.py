"""`solaris train`: the split keeps the future out, training beats the untrained model on
held-out rows, and the export serves what PyTorch computes."""

from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest
import torch

from solaris.app.cli import format_training
from solaris.precompute.export import ExportReport
from solaris.precompute.features import UserWork, model_inputs
from solaris.precompute.model import INPUT_NAMES, build_model
from solaris.precompute.replay_traffic import load_interactions, write_log
from solaris.precompute.runner import OnnxRunner
from solaris.precompute.settings import TrainSettings
from solaris.precompute.train import (
    Scorer,
    TrainReport,
    fit,
    interactions,
    split_by_time,
    train,
)
from tests.conftest import TINY

# A busy week of Zipf-popular items: enough signal for the tiny model to learn in seconds.
QUICK = TrainSettings(epochs=3, learning_rate=0.01, eval_pairs=300)


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str, float]]:
    path = tmp_path_factory.mktemp("log") / "week.csv"
    write_log(path, "week", users=30, items=300, days=7, seed=1)
    return load_interactions(path)


@pytest.fixture(scope="module")
def trained(
    log: list[tuple[str, str, float]], tmp_path_factory: pytest.TempPathFactory
) -> TrainReport:
    return train(log, TINY, QUICK, tmp_path_factory.mktemp("trained") / "trained.onnx")


def test_the_split_and_the_histories_hold_nothing_from_the_future() -> None:
    # Ties on purpose: two rows at the cutoff's timestamp, and one user's two rows at t=3.
    rows = [
        ("a", "i1", 1.0),
        ("b", "i2", 2.0),
        ("a", "i3", 3.0),
        ("a", "i4", 3.0),
        ("b", "i5", 4.0),
        ("a", "i6", 5.0),
        ("b", "i7", 5.0),
        ("a", "i8", 6.0),
    ]
    data = interactions(rows, TINY)

    training, held_out = split_by_time(data.stamp, held_out_share=0.3)

    assert data.stamp[training].max() < data.stamp[held_out].min()
    assert sorted(held_out.tolist()) == [5, 6, 7]  # both rows at t=5 go to the held-out side
    for row in range(len(rows)):
        start, end = data.history_start[row], data.history_end[row]
        assert (data.sequence_stamp[start:end] < data.stamp[row]).all()
    history, length = data.histories(np.array([3, 7]))
    items = {data.item[row]: name for row, (_, name, _) in enumerate(rows)}
    assert [items[i] for i in history[0, : length[0]]] == ["i1"]  # not i3, at the same time
    assert [items[i] for i in history[1, : length[1]]] == ["i1", "i3", "i4", "i6"]


def test_the_history_keeps_the_latest_history_cap_items() -> None:
    rows = [("a", f"i{n}", float(n)) for n in range(TINY.history_cap + 3)]
    data = interactions(rows, TINY)

    history, length = data.histories(np.array([len(rows) - 1]))

    assert length[0] == TINY.history_cap
    expected = [data.item[n] for n in range(2, len(rows) - 1)]
    assert history[0].tolist() == expected


def test_training_beats_the_untrained_model_on_held_out_rows(trained: TrainReport) -> None:
    assert trained.untrained.auc < 0.62
    assert trained.trained.auc >= trained.untrained.auc + 0.1
    assert trained.trained.recall > trained.untrained.recall


def test_the_export_serves_what_pytorch_computes_under_a_new_version(
    trained: TrainReport, tiny_model: ExportReport
) -> None:
    assert trained.export.max_abs_error <= 1e-4
    # tiny_model is the untrained model of the same config and seed.
    assert trained.export.model_version != tiny_model.model_version
    runner = OnnxRunner(trained.export.path)
    work = [UserWork("7", ("12", "40", "3"), ("5", "77")), UserWork("9", (), ("5",))]

    served = runner.compute(work)

    model = build_model(TINY, str(trained.checkpoint))
    inputs = model_inputs(work, runner.sizes)
    with torch.no_grad():
        expected = model(*(torch.from_numpy(inputs[name]) for name in INPUT_NAMES)).numpy()
    assert np.abs(served - expected).max() <= 1e-4
    assert runner.model_version == Path(f"{trained.export.path}.version").read_text().strip()


def test_the_same_seed_trains_the_same_weights(log: list[tuple[str, str, float]]) -> None:
    data = interactions(log[:400], TINY)
    rows = np.arange(len(log[:400]))
    settings = TrainSettings(epochs=1, batch_size=64)

    def weights(seed: int) -> list[torch.Tensor]:
        config = TINY.__class__(**{**TINY.to_dict(), "seed": seed})
        scorer = Scorer(config)
        fit(scorer, data, rows, settings, np.random.default_rng(seed))
        return [p.detach().clone() for p in scorer.parameters()]

    first, again, other = weights(3), weights(3), weights(4)

    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_the_report_shows_both_models_on_the_same_held_out_pairs(trained: TrainReport) -> None:
    lines = format_training(trained, QUICK).splitlines()

    assert f"held out {trained.held_out_pairs:,} from it on" in lines[0]
    assert "each against 100 sampled negatives" in lines[0]
    assert lines[2].split() == ["untrained", "(seed)", f"{trained.untrained.auc:.3f}", ANY]
    assert lines[3].split()[:2] == ["trained", f"{trained.trained.auc:.3f}"]
    assert trained.export.model_version in lines[4]
