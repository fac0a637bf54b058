"""Settings come from defaults, then a TOML file, then SOLARIS_* variables, then flags; a bad
value is refused in one line that names the setting and what it takes."""

import argparse
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from solaris.app.logs import CHATTY_LOGGERS, JsonFormatter, configure_logging
from solaris.app.settings import (
    DaemonSettings,
    LogSettings,
    ServeSettings,
    add_flags,
    load,
    readme_tables,
    with_tables,
)
from solaris.precompute.settings import PrecomputeSettings
from solaris.precompute.speculator import DEFAULT_WEIGHTS, Policy
from solaris.server.l1 import MemoryStore, entry_bytes
from solaris.server.settings import (
    GRPC_MESSAGE_LIMIT,
    SettingsError,
    SidecarSettings,
    StoreSettings,
)
from solaris.server.store import FLOAT32, Freshness

README = Path(__file__).parents[2] / "README.md"
SECRET_URL = "redis://user:hunter2@redis.example:6379/0"


def parse(argv: list[str], environ: dict[str, str], config: Path | None = None) -> ServeSettings:
    parser = argparse.ArgumentParser()
    add_flags(parser, ServeSettings)
    return load(ServeSettings, parser.parse_args(argv), environ, config)


def test_flags_win_over_environment_which_wins_over_defaults() -> None:
    settings = parse(["--port", "6000"], {"SOLARIS_PORT": "5000", "SOLARIS_CACHE_BYTES": "64Mi"})

    assert settings.port == 6000
    assert settings.cache_bytes == 64 * 1024**2
    assert settings.max_items == ServeSettings().max_items


@pytest.mark.parametrize(
    ("argv", "environ", "named"),
    [
        (["--port", "abc"], {}, "port: got abc from --port; must be a port number from 0 to 65535"),
        (["--port", "70000"], {}, "port: got 70000 from --port; must be a port number"),
        (["--max-items", "0"], {}, "max_items: got 0 from --max-items; must be a whole number"),
        ([], {"SOLARIS_CACHE_BYTES": "lots"}, "cache_bytes: got lots from SOLARIS_CACHE_BYTES"),
        ([], {"SOLARIS_TTL_SECONDS": "-1"}, "ttl_seconds: got -1 from SOLARIS_TTL_SECONDS"),
        (["--host", "999.1.1.1"], {}, "host: got 999.1.1.1 from --host; must be an IP address"),
        (["--device", "tpu"], {}, "device: got tpu from --device; must be one of auto, cuda, cpu"),
        (["--precompute", "maybe"], {}, "precompute: got maybe from --precompute; must be true"),
        (["--cache-fraction", "1"], {}, "cache_fraction: .* at least 0 and below 1"),
        (["--metrics-port", "50051"], {}, "metrics_port: got 50051 .* must differ from port"),
        (["--cache-bytes", "1"], {}, "cache_bytes: got 1 from --cache-bytes; must hold one entry"),
        (["--request-stream-bytes", "40Ki"], {}, "request_stream_bytes: got 40Ki .* least 50688"),
        (["--redis", "redis+cluster://h:7000/1"], {}, "redis: .*; names a database other than 0"),
        (
            ["--redis", "redis+cluster://h:7000", "--request-stream-bytes", "200Ki"],
            {},
            "request_stream_bytes: .* entry per shard: at least 304128 .* and 6 shards",
        ),
        (
            ["--stream-shards", "2", "--work-stream-bytes", "90Ki"],
            {},
            "work_stream_bytes: .* 2 sh",
        ),
        (
            ["--memory-limit", "1000", "--cache-fraction", "0.5"],
            {},
            "cache_fraction: got 0.5 .* memory_limit 1000, it makes an L1 cap of 500 bytes",
        ),
        (["--max-items", "5000000"], {}, "max_items: got 5000000 .* less than 2 GiB"),
        ([], {"SOLARIS_MAX_HISTORY": "9999999999"}, "max_items: .* lower max_id_bytes, max_hi"),
    ],
)
def test_bad_values_fail_naming_the_setting_its_origin_and_what_it_takes(
    argv: list[str], environ: dict[str, str], named: str
) -> None:
    with pytest.raises(SettingsError, match=named):
        parse(argv, environ)


def test_a_size_says_which_suffixes_it_takes() -> None:
    with pytest.raises(SettingsError) as refused:
        parse(["--cache-bytes", "-5"], {})

    assert "at least 1" in str(refused.value)
    assert "K, M, G, Ki, Mi or Gi" in str(refused.value)
    assert "256Mi" in str(refused.value)


@pytest.mark.parametrize(
    ("text", "size"),
    [("268435456", 268435456), ("64Mi", 64 * 1024**2), ("1G", 10**9), ("4k", 4000)],
)
def test_sizes_read_with_or_without_a_suffix(text: str, size: int) -> None:
    assert parse(["--cache-bytes", text], {}).cache_bytes == size


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::1", "localhost", "redis-0.redis.ns"])
def test_addresses_and_host_names_are_taken(host: str) -> None:
    assert parse(["--host", host, "--metrics-host", host], {}).host == host


@pytest.mark.parametrize("host", ["999.1.1.1", "1.2.3", "-x.example", "a..b", "a b", ""])
def test_what_is_neither_an_address_nor_a_host_name_is_refused(host: str) -> None:
    with pytest.raises(SettingsError, match=r"host: .*must be an IP address or a host name"):
        parse([f"--host={host}"], {})


@pytest.mark.parametrize("url", ["", "redis://h:6379/0", "rediss://h", "unix:///run/redis.sock"])
def test_redis_urls_of_the_schemes_redis_py_reads_are_taken(url: str) -> None:
    assert parse(["--redis", url], {}).redis == url


@pytest.mark.parametrize("url", ["http://user:hunter2@x", "redis://user:hunter2@h:port", "hunter2"])
def test_a_bad_redis_url_is_refused_without_printing_it(url: str) -> None:
    with pytest.raises(SettingsError, match="redis: got a value from SOLARIS_REDIS") as refused:
        parse([], {"SOLARIS_REDIS": url})

    assert "hunter2" not in str(refused.value)


def test_the_redis_url_never_prints() -> None:
    settings = parse(["--redis", SECRET_URL], {})

    assert settings.redis == SECRET_URL
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings)
    with pytest.raises(ValidationError) as refused:
        SidecarSettings(redis=SECRET_URL, port=-1)
    assert "hunter2" not in str(refused.value)


def test_ports_may_match_when_either_is_zero() -> None:
    assert parse(["--port", "0", "--metrics-port", "0"], {}).port == 0
    assert parse(["--port", "0", "--metrics-port", "9400"], {}).metrics_port == 9400


def test_the_command_refuses_a_bad_setting_at_start() -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "solaris.app.cli", "serve", "--cache-bytes", "-5"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert finished.returncode == 2
    assert "cache_bytes" in finished.stderr
    assert "at least 1" in finished.stderr


def test_the_readme_tables_are_the_generated_ones() -> None:
    readme = README.read_text()

    assert with_tables(readme) == readme, "run: python -m solaris.app.settings README.md"


def test_the_readme_tables_list_every_setting_once() -> None:
    tables = readme_tables()

    for settings_type in (ServeSettings, DaemonSettings, LogSettings):
        for name in settings_type.model_fields:
            flag = "--" + name.replace("_", "-")
            assert tables.count(f"| `{flag}` | `SOLARIS_{name.upper()}` |") == 1, flag


def test_each_command_reads_its_own_settings() -> None:
    assert set(DaemonSettings.model_fields) == {
        *StoreSettings.model_fields,
        *PrecomputeSettings.model_fields,
    }
    assert set(ServeSettings.model_fields) == {
        *SidecarSettings.model_fields,
        *PrecomputeSettings.model_fields,
        "precompute",
    }


def test_the_daemon_needs_redis() -> None:
    with pytest.raises(SettingsError, match="redis: must be set: solaris precompute"):
        load(DaemonSettings, environ={})

    assert load(DaemonSettings, environ={"SOLARIS_REDIS": "redis://h"}).redis == "redis://h"


def test_serve_settings_read_booleans_and_check_the_device() -> None:
    settings = parse(["--precompute", "false"], {"SOLARIS_DEVICE": "cpu"})

    assert (settings.precompute, settings.device) == (False, "cpu")


def test_speculation_weights_come_from_the_flag_with_defaults_for_the_rest() -> None:
    settings = PrecomputeSettings(speculation="prefetch=2, miss", speculation_decay_seconds=30)

    speculation = settings.speculation_settings(ttl_seconds=3600)

    assert speculation.ttl_seconds == 3600
    assert speculation.policies == {Policy.PREFETCH, Policy.MISS}
    assert speculation.weights[Policy.PREFETCH] == 2.0
    assert speculation.weights[Policy.MISS] == DEFAULT_WEIGHTS[Policy.MISS]
    assert speculation.decay_seconds == 30


@pytest.mark.parametrize("text", ["miss=-1", "miss=lots", "miss=inf", "misses=1"])
def test_a_bad_speculation_policy_or_weight_is_refused_by_name(text: str) -> None:
    with pytest.raises(ValidationError, match=r"speculation: .*miss"):
        PrecomputeSettings(speculation=text)
    with pytest.raises(SettingsError, match=rf"speculation: got {text} from --speculation; .*miss"):
        parse(["--speculation", text], {})


def test_a_config_file_is_overridden_by_environment_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "solaris.toml"
    config.write_text('cache-bytes = "64Mi"\ndim = 64\nport = 7000\nttl_seconds = 60\n')

    settings = parse(["--port", "7001"], {"SOLARIS_DIM": "32"}, config)

    assert settings.cache_bytes == 64 * 1024**2
    assert settings.ttl_seconds == 60
    assert settings.dim == 32
    assert settings.port == 7001


def test_one_config_file_serves_both_commands(tmp_path: Path) -> None:
    config = tmp_path / "solaris.toml"
    config.write_text('redis = "redis://h"\nport = 7000\nlog-level = "debug"\ndevice = "cpu"\n')

    daemon = load(DaemonSettings, environ={}, config=config)

    assert (daemon.redis, daemon.device) == ("redis://h", "cpu")
    assert load(ServeSettings, environ={}, config=config).port == 7000
    assert load(LogSettings, environ={}, config=config).log_level == "DEBUG"


def test_a_bad_value_in_the_config_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    config = tmp_path / "solaris.toml"
    config.write_text("port = 70000\n")

    with pytest.raises(SettingsError, match=f"port: got 70000 from {config}; must be a port"):
        parse([], {}, config)


def test_an_unknown_key_in_the_config_file_is_refused_by_name(tmp_path: Path) -> None:
    config = tmp_path / "solaris.toml"
    config.write_text("cache_bites = 1\n")
    with pytest.raises(SettingsError, match="unknown setting 'cache_bites'"):
        parse([], {}, config)


def test_an_unknown_solaris_variable_is_refused_by_name() -> None:
    with pytest.raises(SettingsError, match="SOLARIS_CACHE_BITES is set, but no solaris command"):
        parse([], {"SOLARIS_CACHE_BITES": "64Mi"})


def test_variables_of_other_commands_and_of_kubernetes_service_links_pass() -> None:
    service_links = {
        "SOLARIS_REDIS_SERVICE_HOST": "10.0.0.7",
        "SOLARIS_REDIS_SERVICE_PORT_REDIS": "6379",
        "SOLARIS_REDIS_PORT_6379_TCP_ADDR": "10.0.0.7",
    }
    serve_only = {"SOLARIS_PORT": "6000"}
    assert "port" not in DaemonSettings.model_fields

    daemon = load(
        DaemonSettings, None, {**service_links, **serve_only, "SOLARIS_REDIS": "redis://h"}
    )
    assert daemon.redis == "redis://h"
    assert parse([], service_links).port == ServeSettings().port


def test_a_missing_or_broken_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="config: no file at"):
        parse([], {}, tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("port = \n")
    with pytest.raises(SettingsError, match=r"config: .* is not a TOML file"):
        parse([], {}, broken)


def test_log_levels_are_the_logging_names_in_any_case() -> None:
    assert load(LogSettings, environ={"SOLARIS_LOG_LEVEL": "debug"}).log_level == "DEBUG"
    with pytest.raises(SettingsError, match=r"log_level: got bogus .* one of DEBUG, INFO"):
        load(LogSettings, environ={"SOLARIS_LOG_LEVEL": "bogus"})


def test_the_exporters_libraries_log_at_info_only_when_debugging() -> None:
    try:
        configure_logging("info", "text")
        assert {logging.getLogger(name).level for name in CHATTY_LOGGERS} == {logging.WARNING}
        configure_logging("debug", "text")
        assert {logging.getLogger(name).level for name in CHATTY_LOGGERS} == {logging.NOTSET}
    finally:
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_json_logs_are_one_object_per_line() -> None:
    record = logging.LogRecord("solaris.server", logging.WARNING, "", 0, "l1 %s", ("full",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "solaris.server"
    assert entry["message"] == "l1 full"
    assert entry["time"].endswith("Z")


def test_the_l1_cap_follows_the_memory_limit_when_asked() -> None:
    assert SidecarSettings(cache_bytes=10**5).l1_bytes == 10**5
    assert SidecarSettings(cache_bytes=10**5, memory_limit=10**6).l1_bytes == 10**5
    assert SidecarSettings(memory_limit=10**6, cache_fraction=0.5).l1_bytes == 500_000
    with pytest.raises(ValidationError, match="cache_fraction"):
        SidecarSettings(memory_limit=10**6, cache_fraction=1.5)


def test_the_smallest_l1_cap_taken_holds_one_entry_of_the_longest_ids() -> None:
    dim, id_bytes = 8, 20
    smallest = entry_bytes(dim, 2 * id_bytes)
    with pytest.raises(ValidationError, match="cache_bytes"):
        SidecarSettings(dim=dim, max_id_bytes=id_bytes, cache_bytes=smallest - 1)
    settings = SidecarSettings(dim=dim, max_id_bytes=id_bytes, cache_bytes=smallest)
    store = MemoryStore(settings.l1_bytes, dim)
    user, item = "u" * id_bytes, "i" * id_bytes

    store.write_sync(user, [item], np.ones((1, dim)), Freshness("v", time.time(), 1e12, 1e12))

    assert store.read_sync(user, [item], FLOAT32, time.time()).values.tolist() == [[1.0] * dim]


def test_the_most_items_a_refusal_offers_are_the_most_grpc_takes() -> None:
    with pytest.raises(SettingsError) as refused:
        parse(["--max-items", "5000000"], {})
    offered = re.search(r"to (\d+) at most", str(refused.value))
    assert offered is not None
    most = int(offered.group(1))

    assert parse(["--max-items", str(most)], {}).max_message_bytes < GRPC_MESSAGE_LIMIT
    with pytest.raises(SettingsError, match="max_items"):
        parse(["--max-items", str(most + 1)], {})


def test_l1_keeps_the_dtype_it_is_told_and_refuses_others() -> None:
    from solaris.app.compose import sidecar_parts
    from solaris.server.store import FLOAT16

    settings = load(ServeSettings, environ={"SOLARIS_L1_DTYPE": "float16"})
    assert sidecar_parts(settings).l1.dtype == FLOAT16
    assert sidecar_parts(load(ServeSettings, environ={})).l1.dtype == FLOAT32
    with pytest.raises(SettingsError, match="l1_dtype"):
        load(ServeSettings, environ={"SOLARIS_L1_DTYPE": "int8"})


def test_redis_keeps_the_dtype_it_is_told_and_refuses_others() -> None:
    from solaris.app.compose import daemon_l2
    from solaris.server.store import FLOAT16

    url = {"SOLARIS_REDIS": "redis://127.0.0.1:1/0"}
    assert daemon_l2(load(DaemonSettings, environ=url), "v1").stored_dtype == FLOAT16
    told = load(ServeSettings, environ={**url, "SOLARIS_REDIS_DTYPE": "float32"})
    assert daemon_l2(told, "v1").stored_dtype == FLOAT32
    with pytest.raises(SettingsError, match="redis_dtype"):
        load(DaemonSettings, environ={**url, "SOLARIS_REDIS_DTYPE": "bfloat16"})
