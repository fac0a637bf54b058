"""Settings come from defaults, then SOLARIS_* variables, then flags; bad values name the
setting."""

import argparse
import subprocess
import sys

import pytest

from solaris.server.settings import ServeSettings, SettingsError, add_arguments, from_sources


def parse(argv: list[str], environ: dict[str, str]) -> ServeSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_sources(parser.parse_args(argv), environ)


def test_flags_win_over_environment_which_wins_over_defaults() -> None:
    settings = parse(["--port", "6000"], {"SOLARIS_PORT": "5000", "SOLARIS_CACHE_BYTES": "64Mi"})

    assert settings.port == 6000
    assert settings.cache_bytes == 64 * 1024**2
    assert settings.max_items == ServeSettings().max_items


@pytest.mark.parametrize(
    ("argv", "environ", "named"),
    [
        (["--port", "abc"], {}, "port"),
        (["--max-items", "0"], {}, "max_items"),
        ([], {"SOLARIS_CACHE_BYTES": "lots"}, "cache_bytes"),
        ([], {"SOLARIS_TTL_SECONDS": "-1"}, "ttl_seconds"),
    ],
)
def test_bad_values_fail_naming_the_setting(
    argv: list[str], environ: dict[str, str], named: str
) -> None:
    with pytest.raises(SettingsError, match=named):
        parse(argv, environ)


def test_the_command_refuses_a_bad_setting_at_start() -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "solaris.server.cli", "serve", "--cache-bytes", "-5"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert finished.returncode == 2
    assert "cache_bytes" in finished.stderr
