"""Domain errors of the sidecar core. The gRPC layer maps each one to a status code.

SolarisError
├── InvalidArgument      a request field is malformed or past a cap (names the field)
├── ResourceExhausted    a bounded queue is full; nothing was taken
├── DeadlineExceeded     the caller's deadline passed before the work began
└── Unavailable          a service the request needs (Redis) cannot be reached now
"""


class SolarisError(Exception):
    """Base of every error the core raises on purpose."""


class InvalidArgument(SolarisError):
    """A request field is malformed or past a cap."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class ResourceExhausted(SolarisError):
    """A bounded resource is full; the request was refused whole."""


class DeadlineExceeded(SolarisError):
    """The caller's deadline passed before the work began."""


class Unavailable(SolarisError):
    """A service the request needs (Redis) cannot be reached now; retrying later may work."""
