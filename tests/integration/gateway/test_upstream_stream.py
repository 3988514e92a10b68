"""The upstream pool's streams on a real socket: backpressure, reuse, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from openledger.gateway.upstream import STREAM_HIGH_WATER, UpstreamBroken, UpstreamPool

CHUNKS = 1000
PAYLOAD = b"x" * 4096  # 4 MiB in all: far more than one socket read


async def _server(handler: object) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def _streaming(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(CHUNKS):
                data = b"data: %d %s\n\n" % (i, PAYLOAD)
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        writer.close()


def test_a_stream_not_read_stops_reading_from_the_model_and_resumes() -> None:
    async def run() -> None:
        server, url = await _server(_streaming)
        pool = UpstreamPool(max_connections=1)
        stream = await pool.open_stream(url, "/x", b"{}", 10)
        await asyncio.sleep(0.3)  # the model writes as fast as it can; nobody reads
        conn = stream._conn
        # Paused: the rest waits in the sockets' buffers (TCP pushes back on the model), not in memory.
        assert conn.paused and STREAM_HIGH_WATER <= len(conn.chunks) < CHUNKS // 2
        received = b""
        while chunk := await stream.read():
            received += chunk
        assert received.count(b"data: ") == CHUNKS and not conn.paused
        stream.close()
        again = await pool.open_stream(url, "/x", b"{}", 10)  # the finished connection is reused
        assert again._conn is conn
        again.abort()
        with pytest.raises(UpstreamBroken):
            while await again.read():
                pass
        again.close()
        pool.close()
        server.close()
        await server.wait_closed()

    asyncio.run(run())
