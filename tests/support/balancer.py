"""A TCP balancer on 127.0.0.1 standing in for a Service in front of gateway replicas.

Like a ClusterIP Service or a cloud TCP load balancer it picks a backend per connection, round
robin, and pipes bytes both ways until either side closes; a backend that refuses the connection is
skipped for the next one. `set_backends` is what the endpoints controller does when a replica turns
ready or terminates: new connections go only to the listed backends, open ones stay where they are.
`connections(backend)` counts the open ones, so a test sees when a terminating replica's keep-alive
clients have all moved away. Runs its own asyncio loop in a daemon thread; `close` stops it.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import Counter

Backend = tuple[str, int]
CONNECT_TIMEOUT_S = 2.0
CHUNK = 1 << 16


class Balancer:
    """Round-robin per connection over `backends` (host, port); listens on 127.0.0.1:`port`."""

    def __init__(self, backends: list[Backend]) -> None:
        self._backends = list(backends)
        self._turn = itertools.count()
        self._open: Counter[Backend] = Counter()
        self._lock = threading.Lock()
        self._writers: set[asyncio.StreamWriter] = set()  # open connections, touched on the loop only
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="balancer", daemon=True).start()
        start = asyncio.start_server(self._handle, "127.0.0.1", 0)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(CONNECT_TIMEOUT_S)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def set_backends(self, backends: list[Backend]) -> None:
        with self._lock:
            self._backends = list(backends)

    def connections(self, backend: Backend) -> int:
        with self._lock:
            return self._open[backend]

    async def _connect(self) -> tuple[Backend, asyncio.StreamReader, asyncio.StreamWriter] | None:
        with self._lock:
            backends = list(self._backends)
        for _ in backends:
            backend = backends[next(self._turn) % len(backends)]
            try:
                opening = asyncio.open_connection(*backend)
                reader, writer = await asyncio.wait_for(opening, CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError):
                continue
            return backend, reader, writer
        return None

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        connected = await self._connect()
        if connected is None:
            client_writer.close()
            return
        backend, reader, writer = connected
        with self._lock:
            self._open[backend] += 1
        self._writers |= {client_writer, writer}
        try:
            await asyncio.gather(_pipe(client_reader, writer), _pipe(reader, client_writer))
        finally:
            self._writers -= {client_writer, writer}
            with self._lock:
                self._open[backend] -= 1

    def close(self) -> None:
        """Stop listening, close every open connection and wait for its handler, then stop the loop."""

        async def stop() -> None:
            self._server.close()
            handlers = asyncio.all_tasks() - {asyncio.current_task()}
            for writer in self._writers:
                writer.close()
            if handlers:  # none left when every client had already hung up
                await asyncio.wait(handlers, timeout=CONNECT_TIMEOUT_S)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(CONNECT_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF or a broken connection, then close `writer`, so a close travels through."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()
