"""`solaris train`: the reference model learnt from an interaction log, then exported.

Each logged interaction (user, item, time) is a positive pair: the user's history of items
strictly before `time`, and the item they took next. The objective is whether the user takes
the candidate next, against `negatives` items drawn uniformly from the training catalogue: a
linear head on the pair embedding gives the logit (binary cross-entropy). The head is for
training only: the exported model keeps its inputs and outputs, and the embedding it serves
is the one the head learnt to read.

The split is by time over the whole log: the last `held_out_share` of the rows (all rows at or
after one cutoff timestamp) are held out. Training reads only rows before the cutoff, so no
history nor target from the held-out period reaches the weights; a held-out pair is scored with
its user's history strictly before its own timestamp.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from solaris.precompute.export import ExportReport, export_model
from solaris.precompute.features import buckets
from solaris.precompute.model import ModelConfig, ReferenceModel, build_model
from solaris.precompute.settings import TrainSettings

Rows = Sequence[tuple[str, str, float]]


@dataclass(frozen=True)
class Interactions:
    """A log as table rows: row r is `user[r]` taking `item[r]` at `stamp[r]` (time order),
    with the user's history `sequence[history_start[r]:history_end[r]]`, most recent last:
    their items with a timestamp strictly before `stamp[r]`, the latest `history_cap` kept."""

    user: np.ndarray
    item: np.ndarray
    stamp: np.ndarray
    sequence: np.ndarray
    sequence_stamp: np.ndarray
    history_start: np.ndarray
    history_end: np.ndarray

    def histories(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows' histories, right-padded with 0, and their lengths."""
        length = self.history_end[rows] - self.history_start[rows]
        offsets = np.arange(int(length.max(initial=0)))
        valid = offsets[None, :] < length[:, None]
        index = np.minimum(self.history_start[rows][:, None] + offsets, len(self.sequence) - 1)
        return np.where(valid, self.sequence[index], 0), length


def interactions(rows: Rows, config: ModelConfig) -> Interactions:
    """`rows` (time order, as `load_interactions` gives them) hashed into the model's tables."""
    users = np.array([user for user, _, _ in rows])
    stamp = np.array([time for _, _, time in rows], np.float64)
    _, user_code = np.unique(users, return_inverse=True)
    # Each user's rows together, in time order (stable: ties keep the log's order).
    by_user = np.lexsort((stamp, user_code))
    code, sequence_stamp = user_code[by_user], stamp[by_user]
    new_user = np.diff(code, prepend=-1) != 0
    new_time = new_user | (np.diff(sequence_stamp, prepend=np.nan) != 0)
    # A row's history ends where its run of (user, timestamp) ties starts: strictly earlier.
    end, first = np.empty(len(rows), np.int64), np.empty(len(rows), np.int64)
    end[by_user] = _run_starts(new_time)
    first[by_user] = _run_starts(new_user)
    item = buckets([item for _, item, _ in rows], config.item_buckets)
    return Interactions(
        user=buckets(users.tolist(), config.user_buckets),
        item=item,
        stamp=stamp,
        sequence=item[by_user],
        sequence_stamp=sequence_stamp,
        history_start=np.maximum(first, end - config.history_cap),
        history_end=end,
    )


def _run_starts(starts_run: np.ndarray) -> np.ndarray:
    """For each position, where the run it belongs to starts (`starts_run`: True at each)."""
    return np.maximum.accumulate(np.where(starts_run, np.arange(len(starts_run)), 0))


def split_by_time(stamp: np.ndarray, held_out_share: float) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows): the held-out ones are the last `held_out_share` of the
    rows by time, cut at one timestamp, so every training row is strictly earlier than every
    held-out one (rows tied with the cutoff all go to the held-out side)."""
    if not len(stamp):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ordered = np.sort(stamp)
    cutoff = ordered[min(len(stamp) - 1, int(len(stamp) * (1 - held_out_share)))]
    return np.flatnonzero(stamp < cutoff), np.flatnonzero(stamp >= cutoff)


class Scorer(nn.Module):
    """The reference model and the smallest head that reads its pair embedding as a logit."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.model: ReferenceModel = build_model(config)
        self.head = nn.Linear(config.dim, 1)

    def forward(
        self, user: np.ndarray, history: np.ndarray, length: np.ndarray, candidates: np.ndarray
    ) -> torch.Tensor:
        """Logits (rows, candidates per row) of each row's candidates for its user."""
        rows, per_row = candidates.shape
        tensors = (torch.from_numpy(a) for a in (user, history, length, candidates.reshape(-1)))
        owner = torch.arange(rows).repeat_interleave(per_row)
        embeddings = self.model(*tensors, owner)
        logits: torch.Tensor = self.head(embeddings).reshape(rows, per_row)
        return logits


def sample_negatives(
    rng: np.random.Generator, catalogue: np.ndarray, positive: np.ndarray, count: int
) -> np.ndarray:
    """(len(positive), count) items drawn uniformly from `catalogue`, none a row's positive."""
    drawn = rng.choice(catalogue, size=(len(positive), count))
    clash = drawn == positive[:, None]
    while clash.any():
        drawn[clash] = rng.choice(catalogue, size=int(clash.sum()))
        clash = drawn == positive[:, None]
    return drawn


@dataclass(frozen=True)
class HeldOutScore:
    auc: float
    """Mean over held-out pairs of the share of its negatives the positive outscores."""
    recall: float
    """Share of held-out pairs whose positive ranks in the top k of itself and its negatives."""


@dataclass(frozen=True)
class HeldOut:
    """Held-out pairs, each with the sampled negatives it is ranked against."""

    rows: np.ndarray
    candidates: np.ndarray
    """(pairs, 1 + negatives): the positive first."""

    def score(self, scorer: Scorer, data: Interactions, k: int, batch: int = 256) -> HeldOutScore:
        logits = []
        with torch.no_grad():
            for start in range(0, len(self.rows), batch):
                rows = self.rows[start : start + batch]
                history, length = data.histories(rows)
                chunk = self.candidates[start : start + batch]
                logits.append(scorer(data.user[rows], history, length, chunk).numpy())
        scores = np.concatenate(logits)
        positive, negative = scores[:, :1], scores[:, 1:]
        wins = (negative < positive).mean(1) + 0.5 * (negative == positive).mean(1)
        rank = (negative > positive).sum(1) + 0.5 * (negative == positive).sum(1)
        return HeldOutScore(float(wins.mean()), float((rank < k).mean()))


def held_out_pairs(
    data: Interactions,
    held_out: np.ndarray,
    catalogue: np.ndarray,
    settings: TrainSettings,
    rng: np.random.Generator,
) -> HeldOut:
    """A sample of the held-out rows with negatives from `catalogue` (the items known before
    the cutoff, so that nothing of the held-out period decides what the negatives are)."""
    rows = np.sort(rng.choice(held_out, min(settings.eval_pairs, len(held_out)), replace=False))
    negatives = sample_negatives(rng, catalogue, data.item[rows], settings.eval_negatives)
    return HeldOut(rows, np.concatenate([data.item[rows][:, None], negatives], axis=1))


def fit(
    scorer: Scorer,
    data: Interactions,
    train: np.ndarray,
    settings: TrainSettings,
    rng: np.random.Generator,
    progress: bool = False,
) -> None:
    """`settings.epochs` passes over the training rows in a shuffled order, Adam on BCE; a
    progress bar on stderr with `progress` (tqdm leaves it out where stderr is not a terminal)."""
    from tqdm import tqdm

    optimizer = torch.optim.Adam(scorer.parameters(), lr=settings.learning_rate)
    catalogue = np.unique(data.item[train])
    labels = torch.zeros(1 + settings.negatives)
    labels[0] = 1.0
    loss_of = nn.BCEWithLogitsLoss()
    bar = tqdm(
        total=settings.epochs * len(train),
        disable=None if progress else True,
        unit=" pairs",
        unit_scale=True,
        leave=False,
    )
    with bar:
        for epoch in range(settings.epochs):
            bar.set_description(f"epoch {epoch + 1}/{settings.epochs}")
            order = rng.permutation(train)
            for start in range(0, len(order), settings.batch_size):
                rows = order[start : start + settings.batch_size]
                negatives = sample_negatives(rng, catalogue, data.item[rows], settings.negatives)
                candidates = np.concatenate([data.item[rows][:, None], negatives], axis=1)
                history, length = data.histories(rows)
                logits = scorer(data.user[rows], history, length, candidates)
                loss = loss_of(logits, labels.expand_as(logits))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update(len(rows))


@dataclass(frozen=True)
class TrainReport:
    training_pairs: int
    held_out_pairs: int
    scored_pairs: int
    """The held-out pairs scored (a sample of `eval_pairs` at most)."""
    cutoff: float
    """The first held-out timestamp."""
    untrained: HeldOutScore
    trained: HeldOutScore
    export: ExportReport
    checkpoint: Path


class TooLittleData(ValueError):
    """The log leaves no training rows or no held-out rows at this held-out share."""


def train(
    rows: Rows,
    config: ModelConfig,
    settings: TrainSettings,
    out: Path,
    progress: bool = False,
) -> TrainReport:
    """Trains on `rows` (time order), scores held-out rows before and after, writes the
    weights (`<out>.pt`, a state_dict export-model takes as --checkpoint) and exports them to
    `out`, checked against PyTorch.

    Raises:
        TooLittleData: no row before the cutoff, or none after it, or fewer than two items
            to train on (a negative must be another item).
        ExportCheckError: as export_model.
    """
    data = interactions(rows, config)
    train_rows, held_out = split_by_time(data.stamp, settings.held_out_share)
    if not len(train_rows) or not len(held_out):
        raise TooLittleData(
            f"{len(data.stamp)} rows make {len(train_rows)} training and {len(held_out)} "
            "held-out rows: give a longer log or another held-out share"
        )
    if len(np.unique(data.item[train_rows])) < 2:
        raise TooLittleData(
            "the training rows name one item: negatives need another; give a longer log or "
            "another held-out share"
        )
    rng = np.random.default_rng(config.seed)
    evaluation = held_out_pairs(data, held_out, np.unique(data.item[train_rows]), settings, rng)
    scorer = Scorer(config)
    untrained = evaluation.score(scorer, data, settings.recall_k)
    fit(scorer, data, train_rows, settings, rng, progress)
    trained = evaluation.score(scorer, data, settings.recall_k)
    checkpoint = Path(f"{out}.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(scorer.model.state_dict(), checkpoint)
    report = export_model(config, out, str(checkpoint))
    cutoff = float(data.stamp[held_out].min())
    return TrainReport(
        len(train_rows),
        len(held_out),
        len(evaluation.rows),
        cutoff,
        untrained,
        trained,
        report,
        checkpoint,
    )
