"""A user's mistake ends `solaris` with status 2 and one line on stderr that names the setting
and what it takes: never a traceback. Each case runs the real command in its own process;
`--precompute false` keeps the model out of it, so that it fails (or would serve) at once."""

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVE = ["serve", "--precompute", "false"]


def solaris(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "solaris.app.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def refused(finished: subprocess.CompletedProcess[str], *wanted: str) -> str:
    """The one line the command wrote, checked: status 2, no traceback, each of `wanted`."""
    assert finished.returncode == 2, finished.stderr
    assert "Traceback" not in finished.stderr
    lines = finished.stderr.splitlines()
    assert len(lines) == 1, finished.stderr
    for text in wanted:
        assert text in lines[0]
    return lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on, for as long as the test runs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def environment(**variables: str) -> dict[str, str]:
    return {**os.environ, **variables}


def test_a_host_that_is_no_address() -> None:
    refused(
        solaris(*SERVE, "--host", "999.1.1.1"), "host", "--host", "an IP address or a host name"
    )


def test_a_log_level_that_is_no_logging_name() -> None:
    refused(solaris("--log-level", "bogus", *SERVE), "log_level", "DEBUG, INFO, WARNING")


def test_a_redis_url_of_another_scheme() -> None:
    line = refused(solaris(*SERVE, "--redis", "http://x"), "redis", "redis://, rediss://")
    assert "http://x" not in line


def test_the_metrics_port_equal_to_the_port() -> None:
    argv = [*SERVE, "--port", "45123", "--metrics-port", "45123"]
    refused(solaris(*argv), "metrics_port", "must differ from port")


def test_a_port_already_in_use(taken_port: int) -> None:
    line = refused(solaris(*SERVE, "--port", str(taken_port)), "port", str(taken_port))
    assert "in use" in line


def test_a_metrics_port_already_in_use(taken_port: int) -> None:
    argv = [*SERVE, "--port", "0", "--metrics-port", str(taken_port)]
    refused(solaris(*argv), "metrics_port", str(taken_port), "in use")


def test_a_port_out_of_range() -> None:
    refused(solaris(*SERVE, "--port", "70000"), "port", "70000", "0 to 65535")


def test_a_negative_size() -> None:
    refused(solaris(*SERVE, "--cache-bytes", "-5"), "cache_bytes", "at least 1", "256Mi", "Gi")


def test_a_bad_value_in_the_environment() -> None:
    finished = solaris(*SERVE, env=environment(SOLARIS_MAX_ITEMS="many"))
    refused(finished, "max_items", "SOLARIS_MAX_ITEMS", "a whole number")


def test_a_bad_value_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "solaris.toml"
    config.write_text('ttl-seconds = "an hour"\n')
    refused(solaris("--config", str(config), *SERVE), "ttl_seconds", str(config), "a number")


def test_an_unknown_key_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "solaris.toml"
    config.write_text("cache_bites = 1\n")
    finished = solaris(*SERVE, env=environment(SOLARIS_CONFIG=str(config)))
    refused(finished, "unknown setting 'cache_bites'", str(config))


def test_an_unknown_flag() -> None:
    refused(solaris(*SERVE, "--cache-bites", "1"), "unrecognized arguments: --cache-bites")


def test_a_sidecar_flag_given_to_the_daemon() -> None:
    refused(solaris("precompute", "--redis", "redis://h", "--port", "1"), "--port")


def test_the_daemon_without_redis() -> None:
    refused(solaris("precompute"), "redis: must be set")
