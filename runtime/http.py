"""A tiny asyncio HTTP/1.1 server for ``/metrics``, ``/healthz`` and ``/readyz`` (fog and cloud).

Why not ``prometheus_client.start_http_server``: it serves from a thread, and the fog's
state (counters, the MQTT client, the latency histogram) belongs to its event loop; reading it
from the loop needs no lock. Why not aiohttp: one more dependency for three GET routes.

What it speaks: ``GET`` and ``HEAD`` of a fixed set of paths (the query string is ignored),
one request per connection (``Connection: close``), no request body. Everything is bounded:
the request head (``REQUEST_BYTES_MAX``), the time to send it (``REQUEST_TIMEOUT_S``), the
connections open at once (``CONNECTIONS_MAX``; one more is closed unanswered) and the
time a handler may take (``HANDLER_TIMEOUT_S``; then 503). A handler that raises answers 500
and is logged (``http_handler_failed``); nothing a client sends can stop the server.
"""

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final

import structlog

from runtime.listen import ListenError, url_host

log = structlog.get_logger()

REQUEST_BYTES_MAX: Final = 8192
REQUEST_TIMEOUT_S: Final = 5.0
HANDLER_TIMEOUT_S: Final = 10.0
WRITE_TIMEOUT_S: Final = 10.0
CONNECTIONS_MAX: Final = 16
REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
JSON_TYPE: Final = "application/json"


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[], Awaitable[Response]]


def json_response(status: int, obj: object) -> Response:
    return Response(status, json.dumps(obj, sort_keys=True).encode() + b"\n", JSON_TYPE)


async def healthz() -> Response:
    """``/healthz``: the event loop answers."""
    return json_response(200, {"alive": True})


def readyz_response(why: list[str]) -> Response:
    """``/readyz``: 200 when nothing keeps the service from being ready, else 503 saying why."""
    if why:
        return json_response(503, {"ready": False, "why": why})
    return json_response(200, {"ready": True})


class HttpServer:
    """``routes`` maps a path to a handler. ``start()`` binds (port 0: a free one, then
    ``port`` says which); ``close()`` stops listening and ends open connections."""

    def __init__(self, routes: Mapping[str, Handler], *, host: str, port: int) -> None:
        self._routes = dict(routes)
        self._host, self._port = host, port
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """``http://host:port`` (no trailing slash)."""
        return f"http://{url_host(self._host)}:{self.port}"

    async def start(self) -> None:
        assert self._server is None, "started twice"
        try:
            self._server = await asyncio.start_server(
                self._serve, self._host, self._port, limit=REQUEST_BYTES_MAX
            )
        except OSError as exc:
            raise ListenError(f"cannot listen on {self._host}:{self._port}: {exc}") from exc

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # closing the sockets ends every connection's task by itself (cancelling them would
        # make asyncio's stream callback log each as an error)
        for writer in self._connections.values():
            writer.transport.abort()
        if self._connections:
            await asyncio.wait(self._connections, timeout=HANDLER_TIMEOUT_S + WRITE_TIMEOUT_S)
        await server.wait_closed()

    @property
    def connections(self) -> int:
        """Connections being served now."""
        return len(self._connections)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= CONNECTIONS_MAX or self._server is None:
            writer.transport.abort()  # busy or closing: no task, no buffer, no answer
            return
        self._connections[task] = writer
        try:
            method, response = await self._answer(reader)
            await self._write(writer, method, response)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or was too slow: nothing to answer
        finally:
            del self._connections[task]
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, Response]:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.LimitOverrunError, ValueError):
            return "GET", json_response(400, {"error": "request head too large"})
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return "GET", json_response(400, {"error": "bad request line"})
        method = parts[0].decode("ascii", "replace")
        path = parts[1].decode("ascii", "replace").split("?", 1)[0]
        handler = self._routes.get(path)
        if handler is None:
            return method, json_response(
                404, {"error": "no such path", "paths": sorted(self._routes)}
            )
        if method not in ("GET", "HEAD"):
            return method, json_response(405, {"error": "GET or HEAD only"})
        try:
            async with asyncio.timeout(HANDLER_TIMEOUT_S):
                return method, await handler()
        except TimeoutError:
            return method, json_response(503, {"error": "timed out"})
        except Exception as exc:  # the seam: a handler bug answers 500, the server lives
            log.error("http_handler_failed", path=path, error=type(exc).__name__)
            return method, json_response(500, {"error": type(exc).__name__})

    async def _write(self, writer: asyncio.StreamWriter, method: str, r: Response) -> None:
        head = (
            f"HTTP/1.1 {r.status} {REASONS.get(r.status, 'Unknown')}\r\n"
            f"Content-Type: {r.content_type}\r\n"
            f"Content-Length: {len(r.body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        writer.write(head if method == "HEAD" else head + r.body)
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await writer.drain()
