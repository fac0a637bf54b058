"""The `solaris` command: `serve` runs the sidecar (with the precompute daemon embedded by
default); `precompute` runs the daemon alone against the shared Redis; `export-model` writes
the reference model to ONNX and checks it; `train` learns its weights from a log first."""

import argparse
import math
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from redis.exceptions import RedisClusterException

from solaris.app.extras import missing_extra, provides
from solaris.app.logs import configure_logging
from solaris.app.ports import check_can_listen
from solaris.app.processes import run_daemon, run_sidecar
from solaris.app.settings import DaemonSettings, LogSettings, ServeSettings, add_flags, load
from solaris.precompute.replay_traffic import LOG_PROFILES
from solaris.precompute.return_model import ReturnSettings
from solaris.precompute.settings import DEFAULT_MODEL_DIR, DEFAULT_SPECULATION, TrainSettings
from solaris.precompute.speculator import Policy, SpeculationSettings
from solaris.server.settings import SettingsError, check_writable

if TYPE_CHECKING:
    from solaris.precompute.replay import Budget, Replay
    from solaris.precompute.replay_traffic import Event
    from solaris.precompute.train import TrainReport

USAGE_ERROR = 2
SEED_MAX = 2**32 - 1
LOG_LAYOUT = "a CSV of user,item,timestamp[,rating] (the MovieLens ratings.csv layout)"


class Parser(argparse.ArgumentParser):
    """argparse, telling a usage mistake in one line (not the whole usage) with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: {message} (see {self.prog} --help)\n")


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, but for those whose help says how it is chosen."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="solaris", description=__doc__, allow_abbrev=False)
    add_flags(parser, LogSettings)
    parser.add_argument(
        "--config",
        default=os.environ.get("SOLARIS_CONFIG"),
        metavar="FILE",
        help="A TOML file of settings (names as in --help, with - or _); the environment and "
        "flags win over it. [env: SOLARIS_CONFIG]",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="Run the sidecar.", allow_abbrev=False)
    add_flags(serve, ServeSettings)
    precompute = commands.add_parser(
        "precompute",
        help="Run the precompute daemon alone, on the shared Redis (--redis).",
        allow_abbrev=False,
    )
    add_flags(precompute, DaemonSettings)
    add_replay_parser(commands)
    add_train_parser(commands)
    export = commands.add_parser("export-model", help="Export the reference model to ONNX.")
    export.add_argument("--out", type=Path, default=Path("model.onnx"), help="The ONNX file.")
    export.add_argument("--checkpoint", help="A state_dict file; default: weights from --seed.")
    export.add_argument("--seed", type=seed, default=0, help="Seed for the weights.")
    export.add_argument("--dim", type=whole(1), default=128, help="Width of the embeddings.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs a command; a user's mistake (a setting, a port, a file) ends in one line on stderr
    and status 2, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        logging_settings = load(LogSettings, args, config=args.config)
        configure_logging(logging_settings.log_level, logging_settings.log_format)
        return run(args)
    except KeyboardInterrupt:
        return 130
    except SettingsError as error:
        print(f"{parser.prog} {args.command}: {error}", file=sys.stderr)
        return USAGE_ERROR
    except RedisClusterException as error:
        # `serve` with a daemon, on a Redis Cluster of which no node answers: the daemon's
        # client finds the cluster when made. (`precompute` waits for one instead.)
        print(f"{parser.prog} {args.command}: redis: {error}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    """Runs the command; one that needs an extra not installed is refused saying what to
    install. (serve and precompute import the model stack in the composition root, which
    refuses it the same way.)"""
    extra = {"export-model": "model", "replay": "replay", "train": "train"}.get(args.command)
    try:
        return COMMANDS[args.command](args)
    except ModuleNotFoundError as missing:
        if extra is None or not provides(extra, missing):
            raise
        raise missing_extra(missing, extra) from None


def serve(args: argparse.Namespace) -> int:
    settings = load(ServeSettings, args, config=args.config)
    check_can_listen(settings.host, settings.port, ("host", "port"))
    if settings.health_port:
        names = ("health_host", "health_port")
        check_can_listen(settings.served_health_host, settings.health_port, names)
    if settings.metrics_port:
        names = ("metrics_host", "metrics_port")
        check_can_listen(settings.served_metrics_host, settings.metrics_port, names)
    run_sidecar(settings)
    return 0


def precompute(args: argparse.Namespace) -> int:
    settings = load(DaemonSettings, args, config=args.config)
    if settings.metrics_port:
        names = ("metrics_host", "metrics_port")
        check_can_listen(settings.served_metrics_host, settings.metrics_port, names)
    run_daemon(settings)
    return 0


def add_replay_parser(commands: "argparse._SubParsersAction[Parser]") -> None:
    replay = commands.add_parser(
        "replay",
        help="Replay ranking traffic through the sidecar and daemon; report hit rate by policy.",
        description="Replays ranking traffic (synthetic, or made from an interaction log) "
        "through the sidecar's read path, store, precompute daemon and a small model, on a "
        "simulated clock that jumps from event to event, and reports hit rate, precision and "
        "misses for each speculation policy set and an oracle, at each budget. Every time "
        "(TTL, stale window, decay, budgets) is in seconds of the traffic's own time: for a "
        "log, its timestamps.",
        formatter_class=DefaultsHelp,
        allow_abbrev=False,
    )
    replay.add_argument(
        "--log",
        help=f"An interaction log to replay, {LOG_LAYOUT}; one request per user visit. "
        "Without it: synthetic traffic.",
    )
    replay.add_argument(
        "--budgets",
        type=budgets,
        default="0.1x,0.3x,1x,3x",
        help="Compute budgets, comma-separated: pairs per second, or Nx for N times the "
        "traffic's mean pair rate (pairs requested per second over its span). Fractions of a "
        "pair per second work: the bucket saves up for whole pairs.",
    )
    replay.add_argument(
        "--ttl-seconds",
        type=number(0, above=True),
        help="How long a computed pair is fresh, in traffic seconds; default: 600 for "
        "synthetic traffic, 604800 (a week) for a log.",
    )
    replay.add_argument(
        "--stale-seconds",
        type=number(0),
        default=0.0,
        help="After the TTL, how long a pair is still served as STALE (refresh's window).",
    )
    replay.add_argument(
        "--decay-seconds",
        type=number(0, above=True),
        help="A speculation signal's value falls by e every this many traffic seconds; "
        "default: a tenth of the TTL.",
    )
    replay.add_argument(
        "--speculation",
        default=DEFAULT_SPECULATION,
        help="The policies of the 'all policies' row and their weights (as serve's "
        "--speculation); the rows above it keep the same weights. Leave a policy out to turn "
        "it off.",
    )
    replay.add_argument(
        "--return-min-probability",
        type=probability,
        default=ReturnSettings.min_probability,
        help="return and widen: below this chance of a user's return within the next TTL "
        "their pairs are left to lapse.",
    )
    replay.add_argument(
        "--return-prior-visits",
        type=number(0),
        default=ReturnSettings.prior_visits,
        help="return: how many gaps the pattern of all users counts for in each user's own.",
    )
    replay.add_argument(
        "--return-requests",
        type=whole(1),
        default=ReturnSettings.requests,
        help="return: how many of a user's latest requests it renews the items of.",
    )
    replay.add_argument(
        "--widen-items",
        type=whole(1),
        default=50,
        help="widen: the most pairs offered to a returning user at one look.",
    )
    replay.add_argument(
        "--round-pairs",
        type=whole(1),
        default=4,
        help="While the budget is short of work, compute rounds are merged until they hold "
        "this many pairs (or the next event comes); 1: exactly a round every second.",
    )
    replay.add_argument(
        "--jobs",
        type=whole(1),
        default=os.cpu_count() or 1,
        help="Runs (a policy set at a budget) replayed at a time, each in a process of its own; "
        "memory grows with it. The default is the machine's cores.",
    )
    replay.add_argument(
        "--duration", type=number(0, above=True), default=900.0, help="Synthetic: seconds."
    )
    replay.add_argument(
        "--users",
        type=whole(1),
        help="Synthetic traffic and --make-log: users; default: 2000 (600 for a realistic log).",
    )
    replay.add_argument(
        "--items",
        type=whole(1),
        help="Synthetic traffic and --make-log: items; default: 5000 (9000 for a realistic log).",
    )
    replay.add_argument(
        "--seed", type=seed, default=0, help="Synthetic traffic and --make-log: the seed."
    )
    replay.add_argument("--plot", default="replay.png", help="Where to write the PNG plot.")
    replay.add_argument(
        "--model-dir", default=DEFAULT_MODEL_DIR, help="Where the small replay model is kept."
    )
    replay.add_argument(
        "--make-log",
        metavar="PATH",
        help="Write a generated interaction log in the MovieLens ratings.csv layout to PATH "
        "(--log-profile, --users, --items, --days, --seed) and exit.",
    )
    replay.add_argument(
        "--log-profile",
        choices=LOG_PROFILES,
        default="realistic",
        help="--make-log: realistic (half the users visit once, a few thousands of times, in "
        "bursts between long gaps, items released over the span) or week (every user two "
        "short visits a day, the first generator).",
    )
    replay.add_argument(
        "--days",
        type=number(0, above=True),
        help="--make-log: the log's span in days; default: 7300 (20 years) for realistic, 7 "
        "for week.",
    )
    replay.add_argument(
        "--quality",
        action="store_true",
        help="Instead of the policy report: the ranker's quality at each budget (all "
        "policies) with no FM feature, the FM feature always fresh (the ceiling) and as "
        "served, and the share of the ceiling's gain retained; needs --log and --model.",
    )
    replay.add_argument(
        "--model",
        help="--quality: the ONNX model whose rows are served (one `solaris train` exported); "
        "the replay model's random weights carry no signal.",
    )
    replay.add_argument(
        "--quality-requests",
        type=whole(10),
        default=2_000,
        help="--quality: visits sampled as probes (their features are what memory holds).",
    )
    replay.add_argument(
        "--quality-negatives",
        type=whole(1),
        default=10,
        help="--quality: negatives per probe, drawn uniformly from the items seen before it.",
    )


def budgets(text: str) -> list[tuple[float, bool]]:
    """`25,0.5,1x` -> (value, relative to demand) pairs, each value above 0."""
    values: list[tuple[float, bool]] = []
    for part in text.split(","):
        part = part.strip()
        relative = part.endswith("x")
        try:
            value = float(part.removesuffix("x"))
        except ValueError:
            value = math.nan
        values.append((value, relative))
    if not all(math.isfinite(value) and value > 0 for value, _ in values):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give numbers above 0 (pairs per second) or Nx (N times the traffic's "
            "mean pair rate), such as 0.3x,1x,3x or 25,100"
        )
    return values


def probability(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    value = number(0)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number from 0 to 1")
    return value


def whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `low` (and at most `high`)."""
    words = f"from {low} to {high}" if high is not None else f"of at least {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number {words}")
        return value

    return parse


seed = whole(0, SEED_MAX)


def number(low: float, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number of at least `low` (or, `above`, greater than it)."""
    words = f"above {low:g}" if above else f"of at least {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"{text!r}: give a number {words}")
        return value

    return parse


def replay(args: argparse.Namespace) -> int:
    check_writable(Path(args.make_log or args.plot), "make_log" if args.make_log else "plot")
    if args.make_log:
        return make_log(args)
    speculation = replay_speculation(args)
    if args.quality:
        check_quality_flags(args)
    rows = interaction_rows(args.log) if args.log else []
    events, source = logged_events(args.log, rows) if args.log else synthetic(args)
    ttl = args.ttl_seconds or (604_800.0 if args.log else 600.0)
    decay = args.decay_seconds or ttl / 10
    # The model stack only now, once the traffic is known to be good.
    from solaris.precompute.export import reference_model
    from solaris.precompute.replay import (
        REPLAY_MODEL,
        Replay,
        causal_ceiling,
        demand,
        format_ceiling,
        format_report,
        plot,
        resolve_budgets,
        sweep,
    )
    from solaris.precompute.runner import OnnxRunner

    model = Path(args.model) if args.model else reference_model(args.model_dir, REPLAY_MODEL)
    runner = OnnxRunner(model, "cpu", 1)
    speculation = replace(speculation, decay_seconds=decay, ttl_seconds=ttl)
    mean_rate = demand(events)
    chosen = resolve_budgets(args.budgets, mean_rate)
    engine = Replay(
        events,
        runner,
        ttl,
        args.stale_seconds,
        speculation=speculation,
        round_pairs=args.round_pairs,
    )
    title = (
        f"{source}; demand {mean_rate:.4g} pairs/s (1x)\n"
        f"TTL {ttl:g} s, stale window {args.stale_seconds:g} s, decay {decay:g} s, "
        f"traffic seconds (no compression), rounds of {args.round_pairs}+ pairs, "
        f"--speculation {args.speculation}"
    )
    if args.quality:
        return quality(args, engine, rows, chosen, title)
    results = sweep(engine, chosen, progress=True, jobs=args.jobs)
    print(title)
    print(format_report(results))
    print(format_ceiling(causal_ceiling(events, ttl + args.stale_seconds), results))
    plot(results, args.plot, title)
    print(f"plot: {Path(args.plot).resolve()}")
    return 0


def check_quality_flags(args: argparse.Namespace) -> None:
    """--quality labels a log's visits with a trained model's rows.

    Raises:
        SettingsError: naming log or model, where --quality lacks it.
    """
    if not args.log:
        raise SettingsError("--quality needs --log: the logged interactions are its labels", "log")
    if not args.model:
        raise SettingsError(
            "--quality needs --model: an ONNX model `solaris train` exported", "model"
        )


def quality(
    args: argparse.Namespace,
    engine: "Replay",
    rows: list[tuple[str, str, float]],
    chosen: "list[Budget]",
    title: str,
) -> int:
    from solaris.precompute.quality import (
        format_quality,
        make_probes,
        plot_quality,
        quality_sweep,
        split,
    )
    from solaris.precompute.replay_traffic import LogReplay

    probes = make_probes(
        rows, LogReplay(), args.quality_requests, args.quality_negatives, args.seed
    )
    if not all(len(part) for part in split(probes)):
        raise SettingsError(
            f"{args.log} leaves {len(probes.time)} probes, too few to fit the ranker on the "
            "earlier and score it on the later: give a longer log",
            "log",
        )
    report = quality_sweep(engine, chosen, probes, progress=True)
    title = f"{title}\nranker quality: {Path(args.model).name}, {len(probes.time):,} probes"
    print(title)
    print(format_quality(report.probes, report.none, report.ceiling, report.rows))
    plot_quality(report.rows, report.none, report.ceiling, args.plot, title)
    print(f"plot: {Path(args.plot).resolve()}")
    return 0


def make_log(args: argparse.Namespace) -> int:
    from solaris.precompute.replay_traffic import write_log

    realistic = args.log_profile == "realistic"
    rows = write_log(
        Path(args.make_log),
        args.log_profile,
        args.users or (600 if realistic else 2_000),
        args.items or (9_000 if realistic else 5_000),
        args.days or (7_300.0 if realistic else 7.0),
        args.seed,
    )
    print(f"wrote {args.make_log}: {rows:,} rows ({args.log_profile})")
    return 0


def replay_speculation(args: argparse.Namespace) -> "SpeculationSettings":
    """The speculator's settings the flags give, less what each run sets.

    Raises:
        SettingsError: naming speculation, for a policy it does not know.
    """
    from solaris.precompute.settings import parse_speculation

    weights = parse_speculation(args.speculation)
    return SpeculationSettings(
        policies=frozenset(weights),
        weights=dict.fromkeys(Policy, 0.0) | weights,
        returns=ReturnSettings(
            prior_visits=args.return_prior_visits,
            min_probability=args.return_min_probability,
            requests=args.return_requests,
        ),
        widen_items=args.widen_items,
    )


def synthetic(args: argparse.Namespace) -> "tuple[list[Event], str]":
    """The synthetic traffic the flags ask for, and the report's title."""
    from solaris.precompute.replay_traffic import SyntheticTraffic

    traffic = SyntheticTraffic(
        users=args.users or 2_000,
        items=args.items or 5_000,
        duration_seconds=args.duration,
        seed=args.seed,
    )
    events = traffic.events()
    requests = sum(not e.is_hint for e in events)
    return events, f"synthetic traffic, seed {args.seed}: {requests:,} requests"


def logged_events(log: str, rows: list[tuple[str, str, float]]) -> "tuple[list[Event], str]":
    """The requests the interaction log `log` (read as `rows`) makes, and the report's title.

    Raises:
        SettingsError: naming `log`, if it makes no request.
    """
    from solaris.precompute.replay_traffic import LogReplay, requests_from_log

    events = requests_from_log(rows, LogReplay())
    if not events:
        problem = f"{log} makes no ranking requests ({len(rows)} interactions)"
        raise SettingsError(f"{problem}; give {LOG_LAYOUT}", "log")
    days = (rows[-1][2] - rows[0][2]) / 86_400
    span = f"{days / 365:.1f} years" if days >= 730 else f"{days:.1f} days"
    return events, f"{Path(log).name}: {len(rows):,} rows over {span}, {len(events):,} requests"


def export_model(args: argparse.Namespace) -> int:
    check_writable(args.out, "out")
    from solaris.precompute.export import ExportCheckError, load_model
    from solaris.precompute.export import export_model as export
    from solaris.precompute.model import ModelConfig, flops, parameter_count

    config = ModelConfig(dim=args.dim, seed=args.seed)
    try:
        report = export(config, args.out, args.checkpoint)
    except ExportCheckError as error:
        print(f"export failed: {error}", file=sys.stderr)
        return 1
    model = load_model(config, args.checkpoint)
    user_flops, pair_flops = flops(model)
    print(f"wrote {report.path} (model version {report.model_version})")
    print(f"max abs error against PyTorch: {report.max_abs_error:.3g}")
    print(f"parameters: {parameter_count(model):,}")
    print(f"MFLOP per user (history of {config.history_cap}): {user_flops / 1e6:.1f}")
    print(f"MFLOP per candidate pair: {pair_flops / 1e6:.1f}")
    return 0


def add_train_parser(commands: "argparse._SubParsersAction[Parser]") -> None:
    defaults = TrainSettings()
    train = commands.add_parser(
        "train",
        help="Train the reference model on an interaction log and export it to ONNX.",
        description="Trains the reference model on an interaction log to tell whether a user "
        "takes a candidate item next (against sampled negatives), holding out the log's last "
        "rows by time; prints the held-out AUC and recall of the trained and the untrained "
        "model, and exports the trained one to ONNX (checked against PyTorch), its version "
        "beside it and its weights as <out>.pt.",
        formatter_class=DefaultsHelp,
        allow_abbrev=False,
    )
    train.add_argument("--log", required=True, help=f"The interaction log, {LOG_LAYOUT}.")
    train.add_argument("--out", type=Path, default=Path("model.onnx"), help="The ONNX file.")
    train.add_argument(
        "--epochs", type=whole(1), default=defaults.epochs, help="Passes over the training rows."
    )
    train.add_argument(
        "--batch-size", type=whole(1), default=defaults.batch_size, help="Positives a step."
    )
    train.add_argument(
        "--learning-rate",
        type=number(0, above=True),
        default=defaults.learning_rate,
        help="Adam's learning rate.",
    )
    train.add_argument(
        "--negatives",
        type=whole(1),
        default=defaults.negatives,
        help="Sampled negatives per positive while training.",
    )
    train.add_argument(
        "--held-out-share",
        type=share,
        default=defaults.held_out_share,
        help="The share of the log's rows, the last by time, held out from training.",
    )
    train.add_argument(
        "--eval-pairs",
        type=whole(1),
        default=defaults.eval_pairs,
        help=f"Held-out pairs scored (a sample), each against {defaults.eval_negatives} "
        "sampled negatives.",
    )
    train.add_argument(
        "--seed", type=seed, default=0, help="Seed for the initial weights and the sampling."
    )
    train.add_argument("--dim", type=whole(1), default=128, help="Width of the embeddings.")
    train.add_argument(
        "--threads",
        type=whole(1),
        default=min(8, os.cpu_count() or 1),
        help="CPU threads PyTorch uses.",
    )


def share(text: str) -> float:
    """An argparse type: a number above 0 and below 1."""
    value = number(0, above=True)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number above 0 and below 1")
    return value


def train(args: argparse.Namespace) -> int:
    check_writable(args.out, "out")
    # The model stack first: a missing extra is told before a long log is read.
    import torch

    from solaris.precompute.export import ExportCheckError
    from solaris.precompute.model import ModelConfig
    from solaris.precompute.train import TooLittleData
    from solaris.precompute.train import train as fit

    rows = interaction_rows(args.log)
    torch.set_num_threads(args.threads)
    settings = TrainSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        negatives=args.negatives,
        held_out_share=args.held_out_share,
        eval_pairs=args.eval_pairs,
    )
    try:
        report = fit(rows, ModelConfig(dim=args.dim, seed=args.seed), settings, args.out, True)
    except TooLittleData as error:
        raise SettingsError(f"{args.log}: {error}", "held_out_share") from None
    except ExportCheckError as error:
        print(f"export failed: {error}", file=sys.stderr)
        return 1
    print(format_training(report, settings))
    return 0


def format_training(report: "TrainReport", settings: "TrainSettings") -> str:
    k, negatives = settings.recall_k, settings.eval_negatives
    scores = {"untrained (seed)": report.untrained, "trained": report.trained}
    return "\n".join(
        [
            f"trained on {report.training_pairs:,} rows before timestamp {report.cutoff:.0f}; "
            f"held out {report.held_out_pairs:,} from it on, {report.scored_pairs:,} of them "
            f"scored, each against {negatives} sampled negatives",
            f"{'held-out':>16}  {'AUC':>6}  {f'recall@{k}':>9}",
            *(f"{name:>16}  {s.auc:6.3f}  {s.recall:9.3f}" for name, s in scores.items()),
            f"wrote {report.export.path} (model version {report.export.model_version}), "
            f"weights {report.checkpoint}",
            f"max abs error against PyTorch: {report.export.max_abs_error:.3g}",
        ]
    )


def interaction_rows(log: str) -> list[tuple[str, str, float]]:
    """The log's (user, item, timestamp) rows, oldest first.

    Raises:
        SettingsError: naming `log`, if it cannot be read as one.
    """
    from solaris.precompute.replay_traffic import load_interactions

    try:
        return load_interactions(Path(log))
    except OSError as error:
        raise SettingsError(
            f"cannot read {log} ({error.strerror}); give {LOG_LAYOUT}", "log"
        ) from None
    except ValueError as error:
        raise SettingsError(f"{error}; give {LOG_LAYOUT}", "log") from None


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": serve,
    "precompute": precompute,
    "replay": replay,
    "export-model": export_model,
    "train": train,
}

if __name__ == "__main__":
    sys.exit(main())
