"""The `solaris` command: `serve` runs the sidecar (with the precompute daemon embedded by
default); `precompute` runs the daemon alone against the shared Redis; `export-model` writes
the reference model to ONNX and checks it."""

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from solaris.app.extras import missing_extra, provides
from solaris.app.logs import configure_logging
from solaris.app.ports import check_can_listen
from solaris.app.processes import run_daemon, run_sidecar
from solaris.app.settings import DaemonSettings, LogSettings, ServeSettings, add_flags, load
from solaris.precompute.settings import DEFAULT_MODEL_DIR
from solaris.server.settings import SettingsError, check_writable

if TYPE_CHECKING:
    from solaris.precompute.replay_traffic import Event

USAGE_ERROR = 2
SEED_MAX = 2**32 - 1
LOG_LAYOUT = "a CSV of user,item,timestamp[,rating] (the MovieLens ratings.csv layout)"


class Parser(argparse.ArgumentParser):
    """argparse, telling a usage mistake in one line (not the whole usage) with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: {message} (see {self.prog} --help)\n")


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


def run(args: argparse.Namespace) -> int:
    """Runs the command; one that needs an extra not installed is refused saying what to
    install. (serve and precompute import the model stack in the composition root, which
    refuses it the same way.)"""
    extra = {"export-model": "model", "replay": "replay"}.get(args.command)
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
    )
    replay.add_argument(
        "--log",
        help="A CSV of user,item,timestamp[,rating] (MovieLens "
        "ratings.csv layout); default: synthetic traffic.",
    )
    replay.add_argument(
        "--budgets",
        type=budgets,
        default="25,100,400",
        help="Pairs per second, comma-separated.",
    )
    replay.add_argument("--ttl-seconds", type=number(0), default=600.0)
    replay.add_argument(
        "--stale-seconds",
        type=number(0),
        default=0.0,
        help="After the TTL, how long a pair is still served as STALE (refresh's window).",
    )
    replay.add_argument(
        "--duration", type=number(0, above=True), default=900.0, help="Synthetic: seconds."
    )
    replay.add_argument("--users", type=whole(1), default=2_000, help="Synthetic: users.")
    replay.add_argument("--items", type=whole(1), default=5_000, help="Synthetic: items.")
    replay.add_argument("--seed", type=seed, default=0, help="Synthetic: seed.")
    replay.add_argument(
        "--time-scale",
        type=number(0, above=True),
        default=1440.0,
        help="Log: log seconds per replay second (1440: a day a minute).",
    )
    replay.add_argument("--plot", default="replay.png", help="Where to write the PNG plot.")
    replay.add_argument("--model-dir", default=DEFAULT_MODEL_DIR)
    replay.add_argument(
        "--make-log",
        metavar="PATH",
        help="Write a synthetic interaction log in the MovieLens ratings.csv layout to PATH "
        "(--users, --items, --seed; a week of visits) and exit.",
    )


def budgets(text: str) -> list[float]:
    """`25,100,400` -> pairs per second, each above 0."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(value) and value > 0 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers above 0, such as 25,100,400")
    return values


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
        from solaris.precompute.replay_traffic import write_synthetic_log

        write_synthetic_log(Path(args.make_log), args.users, args.items, days=7, seed=args.seed)
        print(f"wrote {args.make_log}")
        return 0
    events, title = logged_events(args.log, args.time_scale) if args.log else synthetic(args)
    # The model stack only now, once the traffic is known to be good.
    from solaris.precompute.export import reference_model
    from solaris.precompute.replay import REPLAY_MODEL, format_report, plot, sweep
    from solaris.precompute.runner import OnnxRunner

    runner = OnnxRunner(reference_model(args.model_dir, REPLAY_MODEL), "cpu", 1)
    results = sweep(events, runner, args.budgets, args.ttl_seconds, args.stale_seconds)
    print(title)
    print(format_report(results))
    plot(results, args.plot, title)
    print(f"plot: {args.plot}")
    return 0


def synthetic(args: argparse.Namespace) -> "tuple[list[Event], str]":
    """The synthetic traffic the flags ask for, and the report's title."""
    from solaris.precompute.replay_traffic import SyntheticTraffic

    traffic = SyntheticTraffic(
        users=args.users, items=args.items, duration_seconds=args.duration, seed=args.seed
    )
    events = traffic.events()
    return events, f"synthetic, seed {args.seed}: {sum(not e.is_hint for e in events):,} requests"


def logged_events(log: str, time_scale: float) -> "tuple[list[Event], str]":
    """The requests an interaction log makes, and the report's title.

    Raises:
        SettingsError: naming `log`, if it cannot be read as one.
    """
    from solaris.precompute.replay_traffic import LogReplay, load_interactions, requests_from_log

    try:
        rows = load_interactions(Path(log))
    except OSError as error:
        raise SettingsError(
            f"cannot read {log} ({error.strerror}); give {LOG_LAYOUT}", "log"
        ) from None
    except ValueError as error:
        raise SettingsError(f"{error}; give {LOG_LAYOUT}", "log") from None
    events = requests_from_log(rows, LogReplay(time_scale=time_scale))
    if not events:
        problem = f"{log} makes no ranking requests ({len(rows)} interactions)"
        raise SettingsError(f"{problem}; give {LOG_LAYOUT}", "log")
    return events, f"{Path(log).name}: {len(events):,} requests"


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


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": serve,
    "precompute": precompute,
    "replay": replay,
    "export-model": export_model,
}

if __name__ == "__main__":
    sys.exit(main())
