"""Work that runs beside the gRPC server in the same process: the request shipper, and (put
there by the composition root) the precompute daemon and the shared speculator. The sidecar
starts each before it serves and stops each after it has drained."""

import asyncio
from typing import Protocol


class Background(Protocol):
    """Work beside the server: started before it serves, stopped after it drains."""

    async def start(self) -> None:
        """Starts the work and returns; the work goes on until `stop`."""
        ...

    async def stop(self) -> None:
        """Stops the work, finishing what it holds."""
        ...


class ThreadWork(Protocol):
    """Work on a thread of its own, started and stopped by blocking calls."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class OnThread:
    """Runs thread-based work as Background: its blocking `stop` never stalls the event loop."""

    def __init__(self, work: ThreadWork) -> None:
        self.work = work

    async def start(self) -> None:
        self.work.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.work.stop)
