"""The runner computes what the PyTorch model computes, with each user's side done once."""

import numpy as np
import torch

from solaris.precompute.export import ExportReport
from solaris.precompute.features import UserWork, bucket
from solaris.precompute.model import build_model
from solaris.precompute.runner import OnnxRunner
from tests.conftest import TINY


def pytorch_embedding(user: str, history: tuple[str, ...], item: str) -> np.ndarray:
    """The pair's embedding from the PyTorch model, one pair at a time."""
    model = build_model(TINY)
    recent = history[-TINY.history_cap :]
    inputs = [
        [bucket(user, TINY.user_buckets)],
        [[bucket(h, TINY.item_buckets) for h in recent]],
        [len(recent)],
        [bucket(item, TINY.item_buckets)],
        [0],
    ]
    with torch.no_grad():
        return model(*(torch.tensor(x, dtype=torch.int64) for x in inputs)).numpy()[0]


def test_batched_output_equals_pytorch_pair_by_pair(tiny_model: ExportReport) -> None:
    runner = OnnxRunner(tiny_model.path)
    long_history = tuple(f"h{n}" for n in range(20))
    work = [
        UserWork("alice", ("a", "b"), ("x", "y", "z")),
        UserWork("bob", (), ("x",)),
        UserWork("carol", long_history, ("y", "w")),
    ]

    computed = runner.compute(work)

    expected = [pytorch_embedding(w.user_id, w.history, i) for w in work for i in w.item_ids]
    np.testing.assert_allclose(computed, np.stack(expected), atol=1e-5)
    assert runner.pairs_computed == 6


def test_history_changes_the_embedding(tiny_model: ExportReport) -> None:
    runner = OnnxRunner(tiny_model.path)

    with_history, without = runner.compute(
        [UserWork("alice", ("a", "b"), ("x",)), UserWork("alice", (), ("x",))]
    )

    assert np.abs(with_history - without).max() > 1e-3
