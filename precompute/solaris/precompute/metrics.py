"""The precompute side's metrics: the daemon's and the speculators' counters, registered on a
process's LiveValues by its composition root (once, whichever process runs them)."""

from solaris.precompute.daemon import HistoryBook, PrecomputeDaemon
from solaris.precompute.embedded_speculation import EmbeddedSpeculation
from solaris.precompute.shared_speculation import SharedSpeculation
from solaris.server.metrics import LiveValues
from solaris.server.request_stream import EPOCH_SECONDS
from solaris.server.work_stream import StreamWorkSource


def daemon_values(live: LiveValues, daemon: PrecomputeDaemon) -> None:
    stats = daemon.stats
    history_values(live, daemon.histories, "daemon")
    live.counter(
        "solaris_runner_pairs", "Pairs the model computed and stored.", lambda: stats.pairs_computed
    )
    live.counter("solaris_runner_batches", "Model batches run.", lambda: stats.batches)
    live.counter(
        "solaris_runner_failed_batches", "Model batches that raised.", lambda: stats.failed_batches
    )
    live.counter(
        "solaris_poison_pairs_dropped",
        "Pairs the model fails on.",
        lambda: stats.poison_pairs_dropped,
    )
    live.counter(
        "solaris_pairs_already_fresh",
        "Work skipped: already fresh.",
        lambda: stats.pairs_already_fresh,
    )
    live.counter(
        "solaris_store_write_failures",
        "Batches not stored (Redis down).",
        lambda: stats.write_failures,
    )
    live.counter(
        "solaris_precompute_loop_errors",
        "Unexpected errors in the daemon loop.",
        lambda: stats.loop_errors,
    )
    live.counter(
        "solaris_source_errors",
        "Times the work source (Redis) could not be read.",
        lambda: stats.source_errors,
    )


def history_values(live: LiveValues, book: HistoryBook, holder: str) -> None:
    """The `holder`'s (daemon's or speculator's) book of users' histories."""
    live.gauge(
        f"solaris_{holder}_history_bytes",
        "Memory the users' latest Prefetch histories take (--history-bytes).",
        lambda: book.nbytes,
    )
    live.counter(
        f"solaris_{holder}_history_evicted",
        "Users whose history was let go to stay within --history-bytes.",
        lambda: book.evicted_users,
    )


def stream_source_values(live: LiveValues, source: StreamWorkSource) -> None:
    live.counter(
        "solaris_tasks_claimed",
        "Work entries claimed from a stopped daemon.",
        lambda: source.claimed,
    )


def embedded_speculation_values(live: LiveValues, source: EmbeddedSpeculation) -> None:
    history_values(live, source.histories, "speculator")
    live.counter(
        "solaris_speculator_reads_dropped",
        "Reads the embedded speculator never learnt from: its buffer was full.",
        lambda: source.dropped_reads,
    )


def shared_speculation_values(live: LiveValues, speculation: SharedSpeculation) -> None:
    history_values(live, speculation.histories, "speculator")
    stats = speculation.stats
    live.gauge(
        "solaris_speculator_leading",
        "1 while this process is the speculator for every sidecar.",
        lambda: int(stats.leading),
    )
    live.counter(
        "solaris_speculator_requests_read",
        "Reads learnt from, all sidecars.",
        lambda: stats.requests_read,
    )
    live.counter(
        "solaris_speculator_unknown_items",
        "Items of reads left out for an id not yet learnt from the request stream (for at "
        f"most {EPOCH_SECONDS:g} s after the speculator starts reading, or misses entries).",
        lambda: stats.unknown_items,
    )
    live.gauge(
        "solaris_speculator_id_table_bytes",
        "Memory the sidecars' tables of ids take in the speculator.",
        lambda: stats.id_table_bytes,
    )
    live.counter(
        "solaris_speculator_pairs_added",
        "Pairs added to the work stream.",
        lambda: stats.pairs_added,
    )
    live.counter(
        "solaris_speculator_backlog_waits",
        "Rounds that added nothing: the daemons had enough work waiting.",
        lambda: stats.waits_for_backlog,
    )
