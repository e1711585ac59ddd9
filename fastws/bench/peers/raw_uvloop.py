"""The ceiling: a raw uvloop server that moves bytes back, no WebSocket work.

Until the request head ends it buffers; then it answers a fixed 101 (with the
``Sec-WebSocket-Accept`` for the load generator's fixed key, computed once)
and from then on writes every received chunk back unchanged, masked client
frames included. The load generator knows (``--raw``) to expect its own
frames back. Echo, latency, large-message, handshake and memory only: it
does not relay. With ``--certfile``/``--keyfile`` the same over TLS
(uvloop's TLS transport): the ceiling of every uvloop-based server on wss://.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib

import uvloop

from fastws.bench.peers._common import parse_args, server_ssl_context

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = base64.b64encode(hashlib.sha1(KEY + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
RESPONSE = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\n\r\n"
)


class RawEcho(asyncio.Protocol):
    __slots__ = ("transport", "head")

    def connection_made(self, transport):
        self.transport = transport
        self.head = b""

    def data_received(self, data):
        if self.head is None:
            self.transport.write(data)
            return
        head = self.head + data
        i = head.find(b"\r\n\r\n")
        if i < 0:
            self.head = head
            return
        self.head = None
        rest = head[i + 4 :]
        self.transport.write(RESPONSE + rest if rest else RESPONSE)


async def main(host: str, port: int, ssl=None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(RawEcho, host, port, backlog=4096, ssl=ssl)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    a = parse_args(__doc__.splitlines()[0])
    uvloop.run(main(a.host, a.port, server_ssl_context(a)))
