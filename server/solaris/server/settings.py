"""The sidecar's settings: one typed object, filled from defaults, then an optional TOML file
(`--config`), then `SOLARIS_*` environment variables, then command-line flags (later wins). A
bad value fails at start with a message that names the setting.
"""

import argparse
import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from solaris.wire import max_message_bytes

ENV_PREFIX = "SOLARIS_"
_SIZE_UNITS = {
    "": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
}


class SettingsError(ValueError):
    """A setting has a value it cannot take."""


def setting(
    default: Any, help: str, minimum: float | None = None, kind: str = "", secret: bool = False
) -> Any:
    """A settings field. A `secret` one (it may hold a password) is left out of repr."""
    metadata = {"help": help, "minimum": minimum, "kind": kind}
    return field(default=default, metadata=metadata, repr=not secret)


@dataclass(frozen=True)
class ServeSettings:
    """Everything `solaris serve` can be told. Field names map to `--flag-name` and
    `SOLARIS_FIELD_NAME`."""

    host: str = setting("127.0.0.1", "Address to listen on; loopback, as befits a sidecar.")
    port: int = setting(50051, "gRPC port; 0 picks a free one.", minimum=0)
    cache_bytes: int = setting(
        256 * 1024**2, "L1 cap in bytes (suffixes K, M, G, Ki, Mi, Gi).", minimum=1, kind="size"
    )
    memory_limit: int = setting(
        0,
        "The container's memory limit in bytes (from the downward API); 0 if unknown.",
        minimum=0,
        kind="size",
    )
    cache_fraction: float = setting(
        0.0,
        "With memory-limit set: the L1 cap as a fraction of it, instead of cache-bytes.",
        minimum=0,
    )
    dim: int = setting(128, "Values per embedding.", minimum=1)
    ttl_seconds: float = setting(3600.0, "How long a computed embedding is a HIT.", minimum=0)
    stale_seconds: float = setting(
        600.0, "After the TTL, how long it is still served as STALE.", minimum=0
    )
    max_items: int = setting(4096, "Most items in one BatchGet or Prefetch.", minimum=1)
    max_id_bytes: int = setting(256, "Longest user or item id, in UTF-8 bytes.", minimum=1)
    max_history: int = setting(256, "Most history items in one Prefetch.", minimum=0)
    prefetch_queue_pairs: int = setting(
        100_000, "Pairs the Prefetch queue holds before RESOURCE_EXHAUSTED.", minimum=1
    )
    request_log_rows: int = setting(
        1_000_000, "Rows (requested pairs) the request log keeps, oldest dropped.", minimum=1
    )
    grace_seconds: float = setting(
        10.0, "On SIGTERM, how long in-flight calls may take to finish.", minimum=0
    )
    metrics_port: int = setting(
        0, "HTTP port for Prometheus metrics at /metrics; 0 for none.", minimum=0
    )
    metrics_host: str = setting("0.0.0.0", "Address the metrics port listens on (the Pod IP).")
    redis: str = setting(
        "",
        "Redis URL (redis://, or rediss:// for TLS) of the shared store and work queue; empty "
        "for none. A password not in the URL is read from SOLARIS_REDIS_PASSWORD.",
        secret=True,
    )
    redis_timeout_ms: float = setting(
        20.0, "Longest a read or write waits on Redis before going on without it.", minimum=1
    )
    work_stream_length: int = setting(
        1_000_000, "Entries the Redis work stream keeps (approximately), oldest trimmed.", minimum=1
    )
    request_stream_length: int = setting(
        100_000, "Requests the Redis request-log stream keeps (approximately).", minimum=1
    )
    claim_idle_seconds: float = setting(
        30.0, "A work entry left this long by a silent daemon is claimed by another.", minimum=0.1
    )

    def __post_init__(self) -> None:
        check_minimums(self)
        if self.cache_fraction >= 1:
            raise SettingsError(
                f"cache_fraction: must be below 1 (the process needs room too), "
                f"got {self.cache_fraction}"
            )

    @property
    def l1_bytes(self) -> int:
        """The L1 cap: a fraction of the memory limit when both are set, else cache_bytes."""
        if self.memory_limit and self.cache_fraction:
            return int(self.memory_limit * self.cache_fraction)
        return self.cache_bytes

    @property
    def max_message_bytes(self) -> int:
        """Largest gRPC message either way: a full-size request or answer, with room to spare."""
        return max_message_bytes(self.max_items, self.max_id_bytes, self.max_history, self.dim)


def check_minimums(settings: Any) -> None:
    """Raises SettingsError, naming the field, for a value under its declared minimum."""
    for spec in dataclasses.fields(settings):
        minimum = spec.metadata["minimum"]
        value = getattr(settings, spec.name)
        if minimum is not None and value < minimum:
            raise SettingsError(f"{spec.name}: must be at least {minimum}, got {value}")


def add_arguments(parser: argparse.ArgumentParser, settings_type: type = ServeSettings) -> None:
    """Adds one flag per setting. Flags default to None so that unset ones fall through."""
    for spec in dataclasses.fields(settings_type):
        env = ENV_PREFIX + spec.name.upper()
        parser.add_argument(
            "--" + spec.name.replace("_", "-"),
            default=None,
            help=f"{spec.metadata['help']} [env {env}; default {spec.default}]",
        )


def load_config_file(path: str, settings_types: Sequence[type]) -> dict[str, Any]:
    """The settings in a TOML file, keyed by field name (`cache_bytes` or `cache-bytes`)."""
    try:
        with open(path, "rb") as file:
            raw = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise SettingsError(f"config ({path}): {error}") from error
    known = {spec.name for kind in settings_types for spec in dataclasses.fields(kind)}
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    for name in values:
        if name not in known:
            raise SettingsError(f"config ({path}): unknown setting {name!r}")
    return values


def from_sources(
    args: argparse.Namespace,
    environ: Mapping[str, str] = os.environ,
    settings_type: type = ServeSettings,
    file_values: Mapping[str, Any] | None = None,
) -> Any:
    """Builds the settings: defaults, then the file, then the environment, then flags."""
    values: dict[str, Any] = {}
    file_values = file_values or {}
    for spec in dataclasses.fields(settings_type):
        env = ENV_PREFIX + spec.name.upper()
        flag_value = getattr(args, spec.name, None)
        if flag_value is not None:
            values[spec.name] = _parse(spec, flag_value, "--" + spec.name.replace("_", "-"))
        elif env in environ:
            values[spec.name] = _parse(spec, environ[env], env)
        elif spec.name in file_values:
            values[spec.name] = _parse(spec, str(file_values[spec.name]), "config file")
    try:
        return settings_type(**values)
    except SettingsError:
        raise
    except (TypeError, ValueError) as error:
        raise SettingsError(str(error)) from error


def _parse(spec: dataclasses.Field, text: str, source: str) -> Any:
    try:
        if spec.metadata["kind"] == "size":
            return parse_size(text)
        if spec.type is bool or spec.type == "bool":
            return parse_bool(text)
        return spec.type(text) if isinstance(spec.type, type) else text
    except ValueError:
        raise SettingsError(
            f"{spec.name} ({source}): cannot read {text!r} as {spec.type}"
        ) from None


def parse_bool(text: str) -> bool:
    """Reads `true`/`false` (also 1/0, yes/no, on/off)."""
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def parse_size(text: str) -> int:
    """Reads a byte count such as `268435456`, `256Mi` or `1G`."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]i?)?[bB]?\s*", text)
    if match is None:
        raise ValueError(f"not a size: {text!r}")
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]
