"""Before a process starts its servers: can it listen where its settings say? Found here, a
clash is a `BindError` naming the setting, before a model is loaded; found by gRPC, it would
be a C-core log line and a bare RuntimeError, after it."""

import errno
import socket

from solaris.server.settings import BindError, host_port


def check_can_listen(host: str, port: int, names: tuple[str, str]) -> None:
    """Raises BindError unless a socket binds to `host`:`port` (any of the addresses `host`
    resolves to, as gRPC does). `names` are the host's and the port's settings: the error
    names the host's when the address is not this machine's, else the port's."""
    host_name, port_name = names
    address = host_port(host, port)
    try:
        candidates = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise BindError(host_name, address, f"{host}: {error.strerror}") from None
    failure = OSError(errno.EADDRNOTAVAIL, "no address")
    for family, kind, protocol, _, sockaddr in candidates:
        with socket.socket(family, kind, protocol) as probe:
            # As the servers do: a port left in TIME_WAIT by a previous run is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
                return
            except OSError as error:
                failure = error
    culprit = host_name if failure.errno == errno.EADDRNOTAVAIL else port_name
    raise BindError(culprit, address, (failure.strerror or str(failure)).lower())
