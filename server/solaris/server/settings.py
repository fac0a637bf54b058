"""The settings of the serving side, as typed, bounded, frozen pydantic models: what every
process touching the store is told (`StoreSettings`) and what the sidecar adds
(`SidecarSettings`). `solaris.app.settings` composes them per process and fills them from a
TOML file, `SOLARIS_*` variables and flags; here they are only checked.

Each field's type says what it accepts in words (`Accepts`), so that a bad value, wherever it
came from, is refused with one line that names the setting and what it takes.
"""

import bisect
import ipaddress
import os
import re
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import redis.asyncio
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, model_validator
from pydantic_settings import SettingsConfigDict
from redis import connection

from solaris.server.grpc_api.admission import answer_bytes
from solaris.server.l1 import entry_bytes
from solaris.server.redis_store import CLUSTER_SCHEMES, is_cluster, node_url
from solaris.server.request_stream import least_budget
from solaris.server.work_stream import least_work_budget
from solaris.wire import max_message_bytes

DEFAULT_UNSENT_BYTES = 128 * 1024**2
"""The cap on answers not yet sent, when neither it nor the memory limit is set."""
GRPC_MESSAGE_LIMIT = 2**31
"""gRPC takes a message size limit as a C int: below 2 GiB."""


class SettingsError(ValueError):
    """A setting has a value it cannot take. `setting` names it (its field name) where one
    does; the message then starts with it."""

    def __init__(self, problem: str, setting: str = "") -> None:
        super().__init__(f"{setting}: {problem}" if setting else problem)
        self.setting = setting
        self.problem = problem


class BindError(SettingsError):
    """The address a setting names cannot be listened on: in use, not this machine's, or a
    host name that does not resolve."""

    def __init__(self, setting: str, address: str, reason: str = "") -> None:
        detail = f" ({reason})" if reason else ""
        super().__init__(f"cannot listen on {address}{detail}", setting)
        self.address = address


@dataclass(frozen=True)
class Accepts:
    """What a field's type takes, in words (the end of its error message) and as its flag's
    metavar. Pydantic ignores it; `solaris.app.settings` reads it."""

    words: str
    metavar: str
    detail: str = ""


SIZE_SUFFIXES = "K, M, G, Ki, Mi or Gi"
_SIZE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "ki": 1024, "mi": 1024**2}
_SIZE_UNITS["gi"] = 1024**3
_SIZE = re.compile(r"\s*([+-]?\d+)\s*([kKmMgG]i?)?[bB]?\s*")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
REDIS_SCHEMES = ("redis://", "rediss://", *CLUSTER_SCHEMES, "unix://")
CLUSTER_STREAM_SHARDS = 6
"""Shards of each stream on a cluster unless told: 2 per master of 3, 1 per master of 6."""
# How redis-py reads a URL (it raises ValueError), typed: redis-py leaves it unannotated.
_parse_redis_url: Callable[[str], dict[str, Any]] = connection.parse_url
_redis_connection: Callable[[redis.asyncio.ConnectionPool], object] = (
    redis.asyncio.ConnectionPool.make_connection
)
"""Builds (without connecting) a connection from a pool's options: refuses one it does not take."""


def parse_size(value: Any) -> Any:
    """Reads a byte count such as `268435456`, `256Mi` or `1G`; other types go on to pydantic."""
    if not isinstance(value, str):
        return value
    match = _SIZE.fullmatch(value)
    if match is None:
        raise ValueError("not a size")
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]


def physical_memory() -> int:
    """This machine's memory in bytes, as the kernel reports it."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_port(host: str, port: int) -> str:
    """`host:port` as gRPC and logs want it, with an IPv6 address in brackets (`[::1]:50051`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_host(value: str) -> str:
    """An IP address, or a host name of RFC 1123 labels whose last is not all digits (so that
    `999.1.1.1`, no address, is not taken for a name)."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    labels = value.removesuffix(".").split(".")
    if len(value) > 253 or labels[-1].isdigit():
        raise ValueError("not an address or host name")
    if not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError("not an address or host name")
    return value


def check_host_or_empty(value: str) -> str:
    return check_host(value) if value else value


def check_pem_file(value: str) -> str:
    """Empty (none), or a readable file holding a PEM block. Checked when the settings load,
    so that a wrong path is one line at start, not a gRPC failure later."""
    if not value:
        return value
    try:
        text = Path(value).read_bytes()
    except OSError as error:
        raise SettingsError(f"cannot read {value} ({error.strerror}); give a PEM file") from None
    if b"-----BEGIN " not in text:
        raise SettingsError(f"{value} holds no PEM block (-----BEGIN ...); give a PEM file")
    return value


class _EncryptedKey(Exception):
    """Raised instead of OpenSSL's passphrase prompt: gRPC cannot use an encrypted key."""


def _refuse_encrypted_key() -> str:
    raise _EncryptedKey


def check_tls_files(cert: str, key: str, client_ca: str) -> None:
    """Refuses, at start, a key that is not the certificate's, or a CA file of no
    certificate: found by gRPC, either would fail every handshake instead."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_refuse_encrypted_key)
    except _EncryptedKey:
        raise SettingsError(f"{key} is encrypted; give an unencrypted PEM key", "tls_key") from None
    except ssl.SSLError as error:
        raise SettingsError(
            f"{key} is not the private key of {cert} ({error.reason or error})", "tls_key"
        ) from None
    try:
        if client_ca:
            context.load_verify_locations(client_ca)
    except ssl.SSLError as error:
        raise SettingsError(
            f"{client_ca} holds no CA certificate ({error.reason or error})", "tls_client_ca"
        ) from None


def check_redis_url(value: str) -> str:
    """Empty (no Redis), or a URL redis-py connects to. Its text is never put in the error:
    it may hold a password."""
    if not value:
        return value
    if not value.startswith(REDIS_SCHEMES):
        raise ValueError("not a Redis URL")
    try:
        database = _parse_redis_url(node_url(value)).get("db", 0)
        _redis_connection(redis.asyncio.ConnectionPool.from_url(node_url(value)))
    except (ValueError, TypeError):
        raise SettingsError(
            "is not a Redis URL that redis-py can read (check its port, database number and "
            "options)",
            "redis",
        ) from None
    if is_cluster(value) and database != 0:
        raise SettingsError("names a database other than 0, which a Redis Cluster lacks", "redis")
    return value


def check_writable(path: Path, setting: str) -> None:
    """Refuses, before any work is done, a file path that cannot be written: a folder, one
    under a file, or one in a folder that cannot be made or written to.

    Raises:
        SettingsError: naming `setting`.
    """
    try:
        if path.is_dir():
            raise SettingsError(f"{path} is a folder; give the path of a file to write", setting)
        folder = next(parent for parent in path.parents if parent.exists())
        if not folder.is_dir():
            raise SettingsError(f"cannot write {path}: {folder} is a file, not a folder", setting)
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as error:
        raise SettingsError(
            f"cannot write {path} ({error.strerror}); give a path in a folder this user may write",
            setting,
        ) from None


Port = Annotated[int, Field(ge=0, le=65535), Accepts("a port number", "PORT")]
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    Accepts(
        "a size in bytes",
        "SIZE",
        f"a whole number with an optional suffix {SIZE_SUFFIXES}, such as 256Mi",
    ),
]
Host = Annotated[str, AfterValidator(check_host), Accepts("an IP address or a host name", "HOST")]
OptionalHost = Annotated[
    str,
    AfterValidator(check_host_or_empty),
    Accepts("an IP address or a host name, or empty", "HOST"),
]
PemFile = Annotated[
    str,
    AfterValidator(check_pem_file),
    Accepts("the path of a readable PEM file, or empty", "FILE"),
]
RedisUrl = Annotated[
    str,
    AfterValidator(check_redis_url),
    Accepts(
        f"a URL starting {', '.join(REDIS_SCHEMES[:-1])} or {REDIS_SCHEMES[-1]}, or empty", "URL"
    ),
]


class SettingsModel(BaseModel):
    """The base of every settings group: frozen, no unknown names, and no input in a
    validation error's text (a Redis URL may hold a password)."""

    # The settings flavour of ConfigDict (the same keys and more), so that a process's
    # BaseSettings can inherit groups and settings alike without a type conflict.
    model_config: ClassVar[SettingsConfigDict] = SettingsConfigDict(
        frozen=True, extra="forbid", hide_input_in_errors=True
    )


class StoreSettings(SettingsModel):
    """What every process touching the store is told: the sidecar and the daemon."""

    dim: int = Field(128, ge=1, description="Values per embedding.")
    ttl_seconds: float = Field(3600.0, ge=0, description="How long a computed embedding is a HIT.")
    stale_seconds: float = Field(
        600.0, ge=0, description="After the TTL, how long it is still served as STALE."
    )
    redis: RedisUrl = Field(
        "",
        repr=False,
        description="Redis URL (redis://, rediss:// for TLS, or unix://) of the shared store "
        "and work queue, or redis+cluster:// (rediss+cluster://) and one node of a Redis "
        "Cluster; empty for none. A password not in the URL is read from "
        "SOLARIS_REDIS_PASSWORD.",
    )
    stream_shards: int = Field(
        0,
        ge=0,
        le=256,
        description="Keys the work and request streams are each spread over, so that their "
        f"load spreads over a cluster's masters; 0: 1 on one node, {CLUSTER_STREAM_SHARDS} on a "
        "cluster. Every sidecar and daemon must use the same.",
    )
    redis_timeout_ms: float = Field(
        20.0, ge=1, description="Longest a read or write waits on Redis before going on without it."
    )
    redis_dtype: Literal["float16", "float32"] = Field(
        "float16",
        description="The dtype embeddings are written to Redis in: float16 takes half of "
        "float32's bytes per pair (values rounded to nearest); float32 keeps the model's values "
        "exactly. Readers take either, and values in the layout before this setting.",
    )
    max_id_bytes: int = Field(256, ge=1, description="Longest user or item id, in UTF-8 bytes.")
    work_stream_bytes: Size = Field(
        256 * 1024**2,
        ge=1,
        description="Redis memory the work stream may take (suffixes as for cache-bytes): one "
        "task entry per 16.5 KiB of it (an entry's most: a larger task goes in parts), oldest "
        "trimmed. Count it in Redis's maxmemory.",
    )
    request_stream_bytes: Size = Field(
        64 * 1024**2,
        ge=1,
        description="Redis memory the request stream may take (suffixes as for cache-bytes): "
        "one entry per 16.5 KiB of it (an entry's most), oldest trimmed. Count it in Redis's "
        "maxmemory.",
    )
    claim_idle_seconds: float = Field(
        30.0,
        ge=0.1,
        description="A work entry left this long by a silent daemon is claimed by another.",
    )
    metrics_host: OptionalHost = Field(
        "",
        description="Address the metrics port listens on (in a pod: the Pod IP); empty: the "
        "gRPC host for the sidecar, 127.0.0.1 for the daemon.",
    )
    metrics_port: Port = Field(
        0, description="HTTP port for Prometheus metrics at /metrics; 0 for none."
    )

    @property
    def served_metrics_host(self) -> str:
        """Where /metrics listens: metrics_host, or loopback."""
        return self.metrics_host or "127.0.0.1"

    @property
    def shards(self) -> int:
        """Keys each stream is spread over: `stream_shards`, or its default for the URL."""
        if self.stream_shards:
            return self.stream_shards
        return CLUSTER_STREAM_SHARDS if is_cluster(self.redis) else 1

    @model_validator(mode="after")
    def _work_stream_holds_entries(self) -> "StoreSettings":
        least = least_work_budget(self.max_id_bytes) * self.shards
        if self.work_stream_bytes < least:
            raise SettingsError(
                f"must hold an entry per shard: at least {least} bytes with max_id_bytes "
                f"{self.max_id_bytes} and {self.shards} shards",
                "work_stream_bytes",
            )
        return self


class SidecarSettings(StoreSettings):
    """Everything the sidecar's serving part is told: the store's settings and its own."""

    @property
    def served_metrics_host(self) -> str:
        """Where /metrics listens: metrics_host, or the gRPC host."""
        return self.metrics_host or self.host

    host: Host = Field(
        "127.0.0.1", description="Address to listen on; loopback, as befits a sidecar."
    )
    port: Port = Field(50051, description="gRPC port; 0 picks a free one.")
    cache_bytes: Size = Field(
        256 * 1024**2, ge=1, description="L1 cap in bytes (suffixes K, M, G, Ki, Mi, Gi)."
    )
    memory_limit: Size = Field(
        0,
        ge=0,
        description="The container's memory limit in bytes (from the downward API; suffixes as "
        "for cache-bytes); 0 if unknown.",
    )
    cache_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="With memory-limit set: the L1 cap as a fraction of it, instead of "
        "cache-bytes (below 1: the process needs room too).",
    )
    l1_dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="The one dtype L1 keeps embeddings in: a read in it is the fast one, so "
        "match the dtype readers ask for (float16 halves L1's bytes per pair).",
    )
    max_items: int = Field(4096, ge=1, description="Most items in one BatchGet or Prefetch.")
    max_history: int = Field(256, ge=0, description="Most history items in one Prefetch.")
    prefetch_queue_pairs: int = Field(
        100_000, ge=1, description="Pairs the Prefetch queue holds before RESOURCE_EXHAUSTED."
    )
    request_log_bytes: Size = Field(
        0,
        ge=0,
        description="Memory the request log may keep answered reads in, for inspection, oldest "
        "dropped (suffixes as for cache-bytes); 0 keeps none. The speculator and the request "
        "stream get every read either way.",
    )
    grace_seconds: float = Field(
        10.0, ge=0, description="On SIGTERM, how long in-flight calls may take to finish."
    )
    max_concurrent_streams: int = Field(
        100, ge=1, description="Most calls one connection may have open at once; more wait."
    )
    max_unsent_bytes: Size = Field(
        0,
        ge=0,
        description="Bytes of answers built but not yet taken by their callers (a caller that "
        "stops reading holds its answers) the sidecar keeps at once; past it, a read gets "
        "RESOURCE_EXHAUSTED. Each such byte costs about two of memory. 0: an eighth of "
        "memory-limit, or 128Mi without one, and at least one full-size answer (suffixes as "
        "for cache-bytes).",
    )
    keepalive_seconds: float = Field(
        60.0,
        ge=1,
        description="How often the sidecar pings a connection; one that does not answer within "
        "20 s is closed, with the calls and answers it held.",
    )

    health_host: OptionalHost = Field(
        "",
        description="Address the health port listens on (in a pod: the Pod IP, where the "
        "kubelet probes); empty: the gRPC host.",
    )
    health_port: Port = Field(
        0,
        description="A port serving only gRPC health checking, so that probes reach the "
        "sidecar while the data port stays on loopback; 0 for none (health is also served on "
        "the data port).",
    )
    tls_cert: PemFile = Field(
        "",
        description="PEM server certificate (chain): the data port serves TLS (the health "
        "port stays plain: probes speak none); empty: plain.",
    )
    tls_key: PemFile = Field("", description="PEM private key of tls-cert.")
    tls_client_ca: PemFile = Field(
        "",
        description="PEM certificates of the CAs whose client certificates are accepted: with "
        "it, a caller without such a certificate is refused (mutual TLS).",
    )
    auth_token: str = Field(
        "",
        repr=False,
        description="A shared token every call but health checks must carry as metadata "
        "`authorization: Bearer TOKEN` (else UNAUTHENTICATED); empty: none. Never printed.",
    )
    miss_ladder: bool = Field(
        False,
        description="Fill missed BatchGet/Get rows from the user's, item's or global aggregate "
        "when a request does not say (its miss_fill field); off: zero-filled, as MISS rows "
        "always were.",
    )
    reflection: bool = Field(
        True, description="Serve gRPC server reflection (what grpcurl lists); off in production."
    )
    model_version: str = Field(
        "",
        description="With --redis: serve this model version's embeddings and no other; empty: "
        "follow the latest version the daemons announce, once it covers the reads (see "
        "rollout-fraction and rollout-deadline-seconds).",
    )
    rollout_fraction: float = Field(
        0.95,
        gt=0,
        le=1,
        description="A new model version is served once, on sampled reads, it holds this "
        "fraction of the pairs the served one holds.",
    )
    rollout_deadline_seconds: float = Field(
        1800.0,
        ge=0,
        description="A new model version is served this long after its daemons first announced "
        "it, whatever it holds.",
    )
    rollout_samples_per_second: float = Field(
        5.0,
        ge=0,
        description="While a new model version rolls out: reads a second whose pairs (64 at "
        "most) are looked up under both versions in the background; 0: none (the deadline "
        "decides).",
    )
    rollout_window_reads: int = Field(
        100, ge=1, description="Sampled reads the two versions' hit rates are compared over."
    )

    @model_validator(mode="after")
    def _ports_differ(self) -> "SidecarSettings":
        if self.port and self.port == self.metrics_port:
            raise SettingsError(
                f"must differ from port (both {self.port}); 0 serves no metrics", "metrics_port"
            )
        taken = {self.port: "port", self.metrics_port: "metrics_port"}
        if self.health_port and self.health_port in taken:
            raise SettingsError(
                f"must differ from {taken[self.health_port]} (both {self.health_port})",
                "health_port",
            )
        return self

    @model_validator(mode="after")
    def _tls_has_cert_and_key(self) -> "SidecarSettings":
        if bool(self.tls_cert) != bool(self.tls_key):
            missing = "tls_key" if self.tls_cert else "tls_cert"
            raise SettingsError("must be set with the other of tls-cert and tls-key", missing)
        if self.tls_client_ca and not self.tls_cert:
            raise SettingsError("needs tls-cert and tls-key: mutual TLS is TLS", "tls_client_ca")
        if self.tls_cert:
            check_tls_files(self.tls_cert, self.tls_key, self.tls_client_ca)
        return self

    @model_validator(mode="after")
    def _pinned_version_needs_redis(self) -> "SidecarSettings":
        if self.model_version and not self.redis:
            raise SettingsError(
                "needs --redis: without it, the sidecar serves its own daemon's model",
                "model_version",
            )
        return self

    @model_validator(mode="after")
    def _request_stream_holds_entries(self) -> "SidecarSettings":
        least = least_budget(self.max_id_bytes) * self.shards
        if self.request_stream_bytes < least:
            raise SettingsError(
                f"must hold an entry per shard: at least {least} bytes with max_id_bytes "
                f"{self.max_id_bytes} and {self.shards} shards",
                "request_stream_bytes",
            )
        return self

    @model_validator(mode="after")
    def _l1_holds_an_entry(self) -> "SidecarSettings":
        smallest = entry_bytes(self.dim, 2 * self.max_id_bytes)
        if self.l1_bytes >= smallest:
            return self
        needs = (
            f"must hold one entry: at least {smallest} bytes with dim {self.dim} and "
            f"max_id_bytes {self.max_id_bytes}"
        )
        if not self._cap_from_fraction:
            raise SettingsError(needs, "cache_bytes")
        raise SettingsError(
            f"with memory_limit {self.memory_limit}, it makes an L1 cap of {self.l1_bytes} "
            f"bytes, which {needs}",
            "cache_fraction",
        )

    @model_validator(mode="after")
    def _l1_fits_memory(self) -> "SidecarSettings":
        """L1 allocates its cap up front: a cap past the memory there is would fail later, as a
        numpy allocation error."""
        limit = self.memory_limit or physical_memory()
        if self.l1_bytes < limit:
            return self
        where = "memory_limit" if self.memory_limit else "this machine's memory"
        setting = "cache_fraction" if self._cap_from_fraction else "cache_bytes"
        raise SettingsError(
            f"an L1 cap of {self.l1_bytes} bytes must be below {where} ({limit} bytes)", setting
        )

    @model_validator(mode="after")
    def _messages_fit_grpc(self) -> "SidecarSettings":
        if self.max_message_bytes < GRPC_MESSAGE_LIMIT:
            return self
        fits = bisect.bisect_left(
            range(GRPC_MESSAGE_LIMIT), GRPC_MESSAGE_LIMIT, key=self._message_bytes
        )
        fix = (
            f"max_items (to {fits - 1} at most) or the others"
            if fits > 1
            else "max_id_bytes, max_history or dim"
        )
        raise SettingsError(
            f"with max_id_bytes {self.max_id_bytes}, max_history {self.max_history} and dim "
            f"{self.dim}, a full-size message takes {self.max_message_bytes} bytes, and gRPC "
            f"takes less than 2 GiB ({GRPC_MESSAGE_LIMIT} bytes): lower {fix}",
            "max_items",
        )

    @model_validator(mode="after")
    def _unsent_bytes_hold_an_answer(self) -> "SidecarSettings":
        if not self.max_unsent_bytes or self.max_unsent_bytes >= self._largest_answer:
            return self
        raise SettingsError(
            f"must hold one full-size answer: at least {self._largest_answer} bytes with "
            f"max_items {self.max_items} and dim {self.dim}",
            "max_unsent_bytes",
        )

    def _message_bytes(self, max_items: int) -> int:
        return max_message_bytes(max_items, self.max_id_bytes, self.max_history, self.dim)

    @property
    def _cap_from_fraction(self) -> bool:
        return bool(self.memory_limit and self.cache_fraction)

    @property
    def l1_bytes(self) -> int:
        """The L1 cap: a fraction of the memory limit when both are set, else cache_bytes."""
        if self._cap_from_fraction:
            return int(self.memory_limit * self.cache_fraction)
        return self.cache_bytes

    @property
    def served_health_host(self) -> str:
        """Where the health port listens: health_host, or the gRPC host."""
        return self.health_host or self.host

    @property
    def _largest_answer(self) -> int:
        return answer_bytes(self.max_items, self.dim, np.dtype(np.float32))

    @property
    def unsent_bytes_cap(self) -> int:
        """The cap on bytes of answers not yet sent: max_unsent_bytes, else an eighth of the
        memory limit (or a default without one), and at least one full-size answer."""
        if self.max_unsent_bytes:
            return self.max_unsent_bytes
        derived = self.memory_limit // 8 if self.memory_limit else DEFAULT_UNSENT_BYTES
        return max(derived, self._largest_answer)

    @property
    def max_message_bytes(self) -> int:
        """Largest gRPC message either way: a full-size request or answer, with room to spare."""
        return self._message_bytes(self.max_items)
