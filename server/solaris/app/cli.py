"""The `solaris` command: `serve` runs the sidecar (with the precompute daemon embedded by
default); `precompute` runs the daemon alone against the shared Redis; `export-model` writes
the reference model to ONNX and checks it."""

import argparse
import asyncio
import os
import sys
from pathlib import Path

from solaris.app.logs import configure_logging
from solaris.precompute.settings import DEFAULT_MODEL_DIR, PrecomputeSettings
from solaris.server import settings as settings_module
from solaris.server.app import serve_until_signalled


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="solaris", description=__doc__, allow_abbrev=False)
    parser.add_argument(
        "--log-level", default=os.environ.get("SOLARIS_LOG_LEVEL", "INFO"), help="Logging level."
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get("SOLARIS_LOG_FORMAT", "text"),
        help="json: one JSON object per line, for log collectors. [env SOLARIS_LOG_FORMAT]",
    )
    parser.add_argument(
        "--config",
        default=os.environ.get("SOLARIS_CONFIG"),
        help="A TOML file of settings (names as in the table); the environment and flags win "
        "over it. [env SOLARIS_CONFIG]",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="Run the sidecar.")
    settings_module.add_arguments(serve)
    settings_module.add_arguments(serve, PrecomputeSettings)
    precompute = commands.add_parser(
        "precompute", help="Run the precompute daemon alone, on the shared Redis (--redis)."
    )
    settings_module.add_arguments(precompute)
    settings_module.add_arguments(precompute, PrecomputeSettings)
    add_replay_parser(commands)
    export = commands.add_parser("export-model", help="Export the reference model to ONNX.")
    export.add_argument("--out", type=Path, default=Path("model.onnx"), help="The ONNX file.")
    export.add_argument("--checkpoint", help="A state_dict file; default: weights from --seed.")
    export.add_argument("--seed", type=int, default=0, help="Seed for the weights.")
    export.add_argument("--dim", type=int, default=128, help="Width of the embeddings.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    if args.command == "export-model":
        return export_model(args)
    if args.command == "replay":
        return replay(args)
    return run(parser, args)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`serve` or `precompute`: both read the same settings; a bad one exits 2, naming it."""
    from solaris.app.daemon_process import run_until_signalled
    from solaris.precompute.runner import ModelContractError

    try:
        from_file = {}
        if args.config:
            kinds = (settings_module.ServeSettings, PrecomputeSettings)
            from_file = settings_module.load_config_file(args.config, kinds)
        settings = settings_module.from_sources(args, file_values=from_file)
        precompute = settings_module.from_sources(
            args, settings_type=PrecomputeSettings, file_values=from_file
        )
        if args.command == "precompute":
            run_until_signalled(settings, precompute)
        else:
            asyncio.run(serve_until_signalled(settings, precompute))
    except (settings_module.SettingsError, ModelContractError) as error:
        parser.error(str(error))
    return 0


def add_replay_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
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
        "--budgets", default="25,100,400", help="Pairs per second, comma-separated."
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
    budgets = [float(budget) for budget in args.budgets.split(",")]
    results = sweep(events, runner, budgets, args.ttl_seconds, args.stale_seconds)
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
