"""Settings come from defaults, then SOLARIS_* variables, then flags; bad values name the
setting."""

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from solaris.app.logs import JsonFormatter
from solaris.precompute.settings import PrecomputeSettings
from solaris.precompute.speculator import DEFAULT_WEIGHTS, Policy
from solaris.server.settings import (
    ServeSettings,
    SettingsError,
    add_arguments,
    from_sources,
    load_config_file,
)


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
        [sys.executable, "-m", "solaris.app.cli", "serve", "--cache-bytes", "-5"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert finished.returncode == 2
    assert "cache_bytes" in finished.stderr


def test_the_readme_table_lists_every_setting() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()

    for settings_type in (ServeSettings, PrecomputeSettings):
        for spec in dataclasses.fields(settings_type):
            flag = "--" + spec.name.replace("_", "-")
            assert f"| `{flag}` | `SOLARIS_{spec.name.upper()}` |" in readme, flag


def test_precompute_settings_read_booleans_and_check_the_device() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, PrecomputeSettings)

    args = parser.parse_args(["--precompute", "false"])
    settings = from_sources(args, {"SOLARIS_DEVICE": "cpu"}, PrecomputeSettings)

    assert (settings.precompute, settings.device) == (False, "cpu")
    with pytest.raises(SettingsError, match="device"):
        from_sources(args, {"SOLARIS_DEVICE": "tpu"}, PrecomputeSettings)
    with pytest.raises(SettingsError, match="precompute"):
        from_sources(parser.parse_args(["--precompute", "maybe"]), {}, PrecomputeSettings)


def test_speculation_weights_come_from_the_flag_with_defaults_for_the_rest() -> None:
    settings = PrecomputeSettings(speculation="prefetch=2, miss", speculation_decay_seconds=30)

    speculation = settings.speculation_settings()

    assert speculation.policies == {Policy.PREFETCH, Policy.MISS}
    assert speculation.weights[Policy.PREFETCH] == 2.0
    assert speculation.weights[Policy.MISS] == DEFAULT_WEIGHTS[Policy.MISS]
    assert speculation.decay_seconds == 30


@pytest.mark.parametrize("text", ["miss=-1", "miss=lots", "miss=inf", "misses=1"])
def test_a_bad_speculation_policy_or_weight_is_refused_by_name(text: str) -> None:
    with pytest.raises(SettingsError, match=r"speculation: .*miss"):
        PrecomputeSettings(speculation=text)


def test_a_config_file_is_overridden_by_environment_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "solaris.toml"
    config.write_text('cache-bytes = "64Mi"\ndim = 64\nport = 7000\n')
    from_file = load_config_file(str(config), [ServeSettings])
    args = argparse.Namespace(port="7001")
    settings = from_sources(args, {"SOLARIS_DIM": "32"}, ServeSettings, from_file)
    assert settings.cache_bytes == 64 * 1024**2
    assert settings.dim == 32
    assert settings.port == 7001


def test_an_unknown_key_in_the_config_file_is_refused_by_name(tmp_path: Path) -> None:
    config = tmp_path / "solaris.toml"
    config.write_text("cache_bites = 1\n")
    with pytest.raises(SettingsError, match="unknown setting 'cache_bites'"):
        load_config_file(str(config), [ServeSettings])


def test_json_logs_are_one_object_per_line() -> None:
    record = logging.LogRecord("solaris.server", logging.WARNING, "", 0, "l1 %s", ("full",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "solaris.server"
    assert entry["message"] == "l1 full"
    assert entry["time"].endswith("Z")


def test_the_l1_cap_follows_the_memory_limit_when_asked() -> None:
    assert ServeSettings(cache_bytes=100).l1_bytes == 100
    assert ServeSettings(cache_bytes=100, memory_limit=1000).l1_bytes == 100
    assert ServeSettings(memory_limit=1000, cache_fraction=0.5).l1_bytes == 500
    with pytest.raises(SettingsError, match="cache_fraction"):
        ServeSettings(memory_limit=1000, cache_fraction=1.5)
