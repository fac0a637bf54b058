"""A Redis password never reaches the logs, wherever the URL carries it."""

import signal
import subprocess
import sys

import grpc
import pytest

from solaris.server.redis_store import redacted
from tests.server.serving import free_port, wait_until_serving


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:sekret9@h:6379/0", "redis://user:***@h:6379/0"),
        ("redis://:sekret9@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("redis://h:6379/0?password=sekret9", "redis://h:6379/0?password=***"),
        ("unix:///run/r.sock?db=1&password=sekret9", "unix:///run/r.sock?db=1&password=***"),
        ("rediss://h:6380/0?ssl_cert_reqs=none", "rediss://h:6380/0?ssl_cert_reqs=none"),
        (
            "rediss://h:6380/0?ssl_password=sekret9&ssl_cert_reqs=none",
            "rediss://h:6380/0?ssl_password=***&ssl_cert_reqs=none",
        ),
    ],
)
def test_redacted_masks_the_password_in_the_userinfo_and_in_the_options(
    url: str, shown: str
) -> None:
    assert redacted(url) == shown


def test_a_password_in_the_url_options_is_not_logged_by_serve() -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{free_port()}/0?password=sekret9"
    command = [sys.executable, "-m", "solaris.app.cli", "serve", "--precompute", "false"]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--redis", url, "--grace-seconds", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    with process, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        wait_until_serving(channel)
        process.send_signal(signal.SIGTERM)
        logs = process.communicate(timeout=20)[1]
    assert "password=***" in logs
    assert "sekret9" not in logs
