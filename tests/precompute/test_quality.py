"""`solaris replay --quality`: on a log with a planted signal, a model trained on it lifts the
ranker's ceiling above no FM feature; the retained share; the flags."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from solaris.precompute.quality import (
    QualityReport,
    QualityRow,
    Score,
    auc,
    make_probes,
    normalized_entropy,
    quality_sweep,
    retained,
)
from solaris.precompute.replay import Budget, Replay, demand
from solaris.precompute.replay_traffic import LogReplay, load_interactions, requests_from_log
from solaris.precompute.runner import OnnxRunner
from solaris.precompute.settings import TrainSettings
from solaris.precompute.train import train
from tests.conftest import TINY

GROUPS = 4


def planted_log(path: Path, users: int = 40, items: int = 160, days: int = 12) -> None:
    """Each user takes items of their own group only (user % GROUPS == item % GROUPS), every
    group equally popular: who takes what is in the pair, not in popularity."""
    rng = np.random.default_rng(3)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["userId", "movieId", "timestamp"])
        rows = []
        for user in range(users):
            own = [item for item in range(items) if item % GROUPS == user % GROUPS]
            for visit in np.sort(rng.uniform(0, days * 86_400, 2 * days)):
                for step, item in enumerate(rng.choice(own, 3, replace=False)):
                    rows.append((user, int(item), int(visit) + 60 * step))
        writer.writerows(sorted(rows, key=lambda row: row[2]))


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The log, and the tiny model `solaris train`'s function learnt from it."""
    folder = tmp_path_factory.mktemp("planted")
    log = folder / "planted.csv"
    planted_log(log)
    settings = TrainSettings(epochs=12, batch_size=64, learning_rate=0.01, eval_pairs=200)
    train(load_interactions(log), TINY, settings, folder / "planted.onnx")
    return log, folder / "planted.onnx"


@pytest.fixture(scope="module")
def report(planted: tuple[Path, Path]) -> QualityReport:
    log, model = planted
    rows = load_interactions(log)
    events = requests_from_log(rows, LogReplay())
    replay = Replay(events, OnnxRunner(model, "cpu", 1), ttl_seconds=86_400)
    rate = demand(events)
    budgets = [Budget(0.05 * rate, "0.05x"), Budget(3 * rate, "3x")]
    probes = make_probes(rows, LogReplay(), requests=300, negatives=5, seed=0)
    return quality_sweep(replay, budgets, probes)


def test_the_ceiling_beats_no_fm_feature_on_a_planted_signal(report: QualityReport) -> None:
    assert report.ceiling.auc > report.none.auc + 0.1
    assert report.ceiling.ne < report.none.ne - 0.05


def test_more_budget_serves_more_and_keeps_more_of_the_gain(report: QualityReport) -> None:
    small, large = report.rows
    assert large.coverage > small.coverage
    assert large.retained_ne(report.none, report.ceiling) > small.retained_ne(
        report.none, report.ceiling
    )


def test_probes_know_only_the_past_and_label_the_visit() -> None:
    rows = [("a", "x", 0.0), ("b", "y", 10.0), ("a", "y", 5_000.0), ("a", "z", 5_060.0)]
    probes = make_probes(rows, LogReplay(), requests=10, negatives=3, seed=0)
    # The visits after the first row: b's (y unseen before it: no positive) and a's second.
    assert probes.user == ["a"]
    assert probes.time.tolist() == [5_000.0]
    # z is not seen before the visit, so it is no positive; x is the only other known item.
    assert list(zip(probes.item, probes.label.tolist(), strict=True)) == [("y", 1.0), ("x", 0.0)]
    assert probes.base[0, 0] == pytest.approx(math.log1p(1))  # a took one item before


def test_the_retained_share_is_served_less_none_over_ceiling_less_none() -> None:
    assert retained(0.60, 0.80, 0.75) == pytest.approx(0.75)
    none, ceiling = Score(auc=0.6, ne=0.9), Score(auc=0.8, ne=0.7)
    row = QualityRow("1x", 1.0, 0.5, 0.5, Score(auc=0.7, ne=0.85))
    assert row.retained_auc(none, ceiling) == pytest.approx(0.5)
    assert row.retained_ne(none, ceiling) == pytest.approx(0.25)
    assert math.isnan(retained(0.6, 0.6, 0.7))


def test_auc_and_normalized_entropy() -> None:
    labels = np.array([0.0, 0.0, 1.0, 1.0])
    assert auc(labels, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auc(labels, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert normalized_entropy(labels, np.full(4, 0.5)) == pytest.approx(1.0)


def test_the_quality_command(
    planted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from solaris.app.cli import main

    log, model = planted
    png = tmp_path / "quality.png"
    argv = ["replay", "--log", str(log), "--quality", "--model", str(model), "--plot", str(png)]
    assert main([*argv, "--budgets", "1x", "--quality-requests", "100"]) == 0
    out = capsys.readouterr().out
    assert "(b) FM always fresh" in out
    assert "retained NE" in out
    assert f"plot: {png.resolve()}" in out
    assert png.stat().st_size > 0


def test_a_log_too_short_for_the_ranker_exits_2_naming_it(
    planted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from solaris.app.cli import main

    _, model = planted
    log = tmp_path / "short.csv"
    log.write_text("userId,movieId,timestamp\n1,7,1\n1,8,2\n")
    argv = ["replay", "--log", str(log), "--quality", "--model", str(model)]
    assert main([*argv, "--plot", str(tmp_path / "q.png"), "--budgets", "1x"]) == 2
    assert "log: " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--quality-requests", "5"], "--quality-requests"),
        (["--quality-negatives", "0"], "--quality-negatives"),
        (["--quality", "--log", "LOG"], "model"),
        (["--quality", "--model", "M.onnx"], "log"),
    ],
)
def test_bad_quality_flags_exit_2_naming_the_flag(
    flags: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from solaris.app.cli import main

    flags = [str(tmp_path / "log.csv") if flag == "LOG" else flag for flag in flags]
    try:  # argparse exits on a bad value; a missing setting returns the status
        status = main(["replay", "--plot", str(tmp_path / "q.png"), *flags])
    except SystemExit as exited:
        status = exited.code
    assert status == 2
    assert named in capsys.readouterr().err
