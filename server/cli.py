"""The `solaris` command."""

import argparse
import asyncio
import logging
import sys

from solaris.server import settings as settings_module
from solaris.server.app import serve_until_signalled


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="solaris", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="Run the sidecar.")
    settings_module.add_arguments(serve)
    parser.add_argument("--log-level", default="INFO", help="Python logging level.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = settings_module.from_sources(args)
    except settings_module.SettingsError as error:
        parser.error(str(error))
    asyncio.run(serve_until_signalled(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
