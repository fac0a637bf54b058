"""The `solaris` command: `serve` runs the sidecar (with the precompute daemon embedded by
default); `precompute` runs the daemon alone against the shared Redis; `export-model` writes
the reference model to ONNX and checks it."""

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from solaris.app.logs import configure_logging
from solaris.app.ports import check_can_listen
from solaris.app.processes import run_daemon, run_sidecar
from solaris.app.settings import DaemonSettings, LogSettings, ServeSettings, add_flags, load
from solaris.precompute.settings import DEFAULT_MODEL_DIR
from solaris.server.settings import SettingsError

USAGE_ERROR = 2


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
    export.add_argument("--seed", type=int, default=0, help="Seed for the weights.")
    export.add_argument("--dim", type=int, default=128, help="Width of the embeddings.")
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
    except Exception as error:
        if not is_user_mistake(error):
            raise
        print(f"{parser.prog} {args.command}: {told(error)}", file=sys.stderr)
        return USAGE_ERROR


def run(args: argparse.Namespace) -> int:
    if args.command == "export-model":
        return export_model(args)
    if args.command == "replay":
        return replay(args)
    if args.command == "precompute":
        return precompute(args)
    return serve(args)


def is_user_mistake(error: Exception) -> bool:
    """A refused setting (a model file that does not fit the runner is one), or a file named
    that cannot be read."""
    return isinstance(error, SettingsError) or (
        isinstance(error, OSError) and error.filename is not None
    )


def told(error: Exception) -> str:
    if isinstance(error, OSError):
        return f"{error.filename}: {error.strerror}"
    return str(error)


def serve(args: argparse.Namespace) -> int:
    settings = load(ServeSettings, args, config=args.config)
    check_can_listen(settings.host, settings.port, ("host", "port"))
    if settings.metrics_port:
        names = ("metrics_host", "metrics_port")
        check_can_listen(settings.metrics_host, settings.metrics_port, names)
    run_sidecar(settings)
    return 0


def precompute(args: argparse.Namespace) -> int:
    settings = load(DaemonSettings, args, config=args.config)
    if settings.metrics_port:
        names = ("metrics_host", "metrics_port")
        check_can_listen(settings.metrics_host, settings.metrics_port, names)
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
    replay.add_argument("--ttl-seconds", type=float, default=600.0)
    replay.add_argument(
        "--stale-seconds",
        type=float,
        default=0.0,
        help="After the TTL, how long a pair is still served as STALE (refresh's window).",
    )
    replay.add_argument("--duration", type=float, default=900.0, help="Synthetic: seconds.")
    replay.add_argument("--users", type=int, default=2_000, help="Synthetic: users.")
    replay.add_argument("--items", type=int, default=5_000, help="Synthetic: items.")
    replay.add_argument("--seed", type=int, default=0, help="Synthetic: seed.")
    replay.add_argument(
        "--time-scale",
        type=float,
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
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers above 0, such as 25,100,400")
    return values


def replay(args: argparse.Namespace) -> int:
    from solaris.precompute.export import reference_model
    from solaris.precompute.replay import REPLAY_MODEL, format_report, plot, sweep
    from solaris.precompute.replay_traffic import (
        LogReplay,
        SyntheticTraffic,
        load_interactions,
        requests_from_log,
        write_synthetic_log,
    )
    from solaris.precompute.runner import OnnxRunner

    if args.make_log:
        write_synthetic_log(Path(args.make_log), args.users, args.items, days=7, seed=args.seed)
        print(f"wrote {args.make_log}")
        return 0
    if args.log:
        rows = load_interactions(Path(args.log))
        events = requests_from_log(rows, LogReplay(time_scale=args.time_scale))
        title = f"{Path(args.log).name}: {len(events):,} requests"
    else:
        traffic = SyntheticTraffic(
            users=args.users, items=args.items, duration_seconds=args.duration, seed=args.seed
        )
        events = traffic.events()
        title = f"synthetic, seed {args.seed}: {sum(not e.is_hint for e in events):,} requests"
    runner = OnnxRunner(reference_model(args.model_dir, REPLAY_MODEL), "cpu", 1)
    results = sweep(events, runner, args.budgets, args.ttl_seconds, args.stale_seconds)
    print(title)
    print(format_report(results))
    plot(results, args.plot, title)
    print(f"plot: {args.plot}")
    return 0


def export_model(args: argparse.Namespace) -> int:
    from solaris.precompute.export import ExportCheckError
    from solaris.precompute.export import export_model as export
    from solaris.precompute.model import ModelConfig, build_model, flops, parameter_count

    config = ModelConfig(dim=args.dim, seed=args.seed)
    try:
        report = export(config, args.out, args.checkpoint)
    except ExportCheckError as error:
        print(f"export failed: {error}", file=sys.stderr)
        return 1
    model = build_model(config, args.checkpoint)
    user_flops, pair_flops = flops(model)
    print(f"wrote {report.path} (model version {report.model_version})")
    print(f"max abs error against PyTorch: {report.max_abs_error:.3g}")
    print(f"parameters: {parameter_count(model):,}")
    print(f"MFLOP per user (history of {config.history_cap}): {user_flops / 1e6:.1f}")
    print(f"MFLOP per candidate pair: {pair_flops / 1e6:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
