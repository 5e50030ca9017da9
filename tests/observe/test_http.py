"""runtime/http.py: the small asyncio server behind /metrics, /healthz and /readyz, spoken to
over real sockets on 127.0.0.1."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Final

import pytest

from runtime.http import CONNECTIONS_MAX, REQUEST_BYTES_MAX, HttpServer, Response, json_response
from runtime.listen import ListenError, parse_listen, url_host

IO_TIMEOUT_S: Final = 10.0


async def ok() -> Response:
    return Response(200, b"fine\n")


async def broken() -> Response:
    raise RuntimeError("a bug in a handler")


@pytest.fixture
async def server() -> AsyncIterator[HttpServer]:
    s = HttpServer(
        {"/healthz": ok, "/broken": broken, "/json": lambda: _json()}, host="127.0.0.1", port=0
    )
    await s.start()
    yield s
    await s.close()


async def _json() -> Response:
    return json_response(503, {"ready": False})


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(IO_TIMEOUT_S):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        data = await reader.read()
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


async def test_get_head_and_errors(server: HttpServer) -> None:
    assert server.url == f"http://127.0.0.1:{server.port}" and server.port > 0
    status, headers, body = await request(server.port, b"GET /healthz?x=1 HTTP/1.1\r\n\r\n")
    assert (status, body, headers["Content-Length"]) == (200, b"fine\n", "5")
    assert headers["Connection"] == "close"
    status, headers, body = await request(server.port, b"HEAD /healthz HTTP/1.0\r\n\r\n")
    assert (status, body, headers["Content-Length"]) == (200, b"", "5")
    status, _, body = await request(server.port, b"GET /nope HTTP/1.1\r\n\r\n")
    assert status == 404 and json.loads(body)["paths"] == ["/broken", "/healthz", "/json"]
    status, _, _ = await request(server.port, b"POST /healthz HTTP/1.1\r\n\r\n")
    assert status == 405
    status, _, _ = await request(server.port, b"GARBAGE\r\n\r\n")
    assert status == 400
    status, _, _ = await request(
        server.port, b"GET /healthz HTTP/1.1\r\nX: " + b"a" * REQUEST_BYTES_MAX
    )
    assert status == 400
    status, headers, body = await request(server.port, b"GET /json HTTP/1.1\r\n\r\n")
    assert (status, headers["Content-Type"], json.loads(body)) == (
        503,
        "application/json",
        {"ready": False},
    )


async def test_a_handler_bug_answers_500_and_the_server_lives(server: HttpServer) -> None:
    status, _, body = await request(server.port, b"GET /broken HTTP/1.1\r\n\r\n")
    assert status == 500 and json.loads(body) == {"error": "RuntimeError"}
    status, _, _ = await request(server.port, b"GET /healthz HTTP/1.1\r\n\r\n")
    assert status == 200


async def test_connections_are_bounded(server: HttpServer) -> None:
    idle = []
    for _ in range(CONNECTIONS_MAX):  # connected, sending nothing: each holds a slot
        idle.append(await asyncio.open_connection("127.0.0.1", server.port))
    try:
        # the server counts a connection when its task runs: wait until all hold a slot
        async with asyncio.timeout(IO_TIMEOUT_S):
            while server.connections < CONNECTIONS_MAX:  # noqa: ASYNC110 (no event for it)
                await asyncio.sleep(0.01)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            assert await reader.read() == b""  # one more: closed unanswered
            writer.close()
    finally:
        for _, writer in idle:
            writer.close()
    async with asyncio.timeout(IO_TIMEOUT_S):
        while server.connections:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    status, _, _ = await request(server.port, b"GET /healthz HTTP/1.1\r\n\r\n")
    assert status == 200


async def test_close_ends_idle_connections_and_a_taken_port_is_a_listen_error() -> None:
    first = HttpServer({"/healthz": ok}, host="127.0.0.1", port=0)
    await first.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", first.port)
    second = HttpServer({"/healthz": ok}, host="127.0.0.1", port=first.port)
    with pytest.raises(ListenError, match=r"cannot listen on 127\.0\.0\.1"):
        await second.start()
    async with asyncio.timeout(IO_TIMEOUT_S):
        await first.close()
        assert await reader.read() == b""  # closed without an answer
    writer.close()


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("0.0.0.0:80") == ("0.0.0.0", 80)
    for bad in ("localhost:9464", "9464", "127.0.0.1:", "127.0.0.1:65536", "1.2.3.4:x", "::1:5"):
        with pytest.raises(ListenError):
            parse_listen(bad)
    assert [url_host(h) for h in ("0.0.0.0", "::", "::1", "10.0.0.1")] == [
        "127.0.0.1",
        "[::1]",
        "[::1]",
        "10.0.0.1",
    ]
