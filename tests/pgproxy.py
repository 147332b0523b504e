"""A TCP proxy in front of PostgreSQL for fault tests: one worker's database traffic made slow or
held while everything else runs at full speed.

Loopback only, a bounded number of connections, and no buffering of its own beyond one message:
while a direction is held the proxy stops reading it, so the sender's socket buffers fill and TCP
holds the rest. It reads the client's side of the PostgreSQL protocol (messages are a type byte
and a length) just enough to recognise one statement: `hold_after(text)` holds a connection's
client-to-server bytes right after the server was asked to run a statement whose text contains
`text` (asyncpg sends a statement's text once per connection, in its Parse message, and names it
in every later Bind), so a test can freeze a worker inside its transaction at an exact point.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field

SSL_REQUEST = 80877103
GSS_REQUEST = 80877104
CANCEL_REQUEST = 80877102
MAX_CONNECTIONS = 64
CHUNK = 65536
UP, DOWN = "up", "down"


@dataclass
class _Connection:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    statements: dict[str, str] = field(default_factory=dict)
    open: asyncio.Event = field(default_factory=asyncio.Event)
    """Client-to-server bytes flow while set (cleared by `hold_after`)."""


class PgProxy:
    """`async with PgProxy(host, port) as proxy:` listens on `proxy.port` (127.0.0.1)."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.delay_s = {UP: 0.0, DOWN: 0.0}
        """Added before every chunk forwarded in that direction (a slow link)."""
        self.flowing = {UP: asyncio.Event(), DOWN: asyncio.Event()}
        """A direction of every connection moves bytes only while its event is set (`stall`)."""
        for event in self.flowing.values():
            event.set()
        self.connections: list[_Connection] = []
        self.hit = asyncio.Event()
        """Set once an armed `hold_after` held a connection."""
        self._trigger: str | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> PgProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def url(self, database_url: str) -> str:
        """`database_url` with its host and port replaced by the proxy's."""
        scheme, rest = database_url.split("://", 1)
        credentials, _, location = rest.rpartition("@")
        path = location.split("/", 1)[1]
        return f"{scheme}://{credentials}@127.0.0.1:{self.port}/{path}"

    def hold_after(self, text: str) -> None:
        """Arm: the next connection asked to run a statement containing `text` is held after it."""
        self.hit.clear()
        self._trigger = text

    def stall(self, direction: str) -> None:
        """Hold every connection's bytes in `direction` (UP: to PostgreSQL, DOWN: its answers)."""
        self.flowing[direction].clear()

    def resume(self) -> None:
        """Release every stall and every held connection (and disarm `hold_after`)."""
        self._trigger = None
        for event in self.flowing.values():
            event.set()
        for c in self.connections:
            c.open.set()

    async def close(self) -> None:
        self.resume()
        if self._server is not None:
            self._server.close()
        for c in self.connections:
            for w in (c.client, c.server):
                w.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # ------------------------------------------------------------------------------ plumbing

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.connections) >= MAX_CONNECTIONS:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        conn = _Connection(writer, up_writer)
        conn.open.set()
        self.connections.append(conn)
        tasks = [
            asyncio.create_task(self._client_to_server(reader, conn)),
            asyncio.create_task(self._server_to_client(up_reader, conn)),
        ]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for w in (writer, up_writer):
                w.close()
            self.connections.remove(conn)
            self._tasks.difference_update(tasks)

    async def _send(self, direction: str, writer: asyncio.StreamWriter, data: bytes) -> None:
        await self.flowing[direction].wait()
        if self.delay_s[direction]:
            await asyncio.sleep(self.delay_s[direction])  # the fault itself: a slow database link
        writer.write(data)
        await writer.drain()

    async def _server_to_client(self, reader: asyncio.StreamReader, conn: _Connection) -> None:
        while data := await reader.read(CHUNK):
            await self._send(DOWN, conn.client, data)

    async def _client_to_server(self, reader: asyncio.StreamReader, conn: _Connection) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            # untyped start-up messages: an SSL or GSS request (answered with one byte), the
            # startup message, or a cancel request
            while True:
                head = await reader.readexactly(8)
                length, code = struct.unpack("!ii", head)
                body = await reader.readexactly(length - 8)
                await self._send(UP, conn.server, head + body)
                if code not in (SSL_REQUEST, GSS_REQUEST):
                    break
            # typed messages: type byte, int32 length (counting itself), body
            bound = ""
            while True:
                await conn.open.wait()
                head = await reader.readexactly(5)
                kind, length = head[:1], struct.unpack("!i", head[1:])[0]
                body = await reader.readexactly(length - 4)
                if kind == b"P":
                    name, query = body.split(b"\0", 2)[:2]
                    conn.statements[name.decode()] = query.decode(errors="replace")
                elif kind == b"B":
                    bound = conn.statements.get(body.split(b"\0", 2)[1].decode(), "")
                elif kind == b"Q":
                    bound = body.split(b"\0", 1)[0].decode(errors="replace")
                await self._send(UP, conn.server, head + body)
                if kind in (b"S", b"Q"):
                    trigger = self._trigger
                    if trigger is not None and trigger in bound and not self.hit.is_set():
                        conn.open.clear()
                        self.hit.set()
                    bound = ""
