"""The store-and-forward ceiling: the raw uvloop relay, one whole frame at a time.

Like ``raw_uvloop`` it answers a fixed 101 and then writes the client's own
(masked) frames back unchanged, with no WebSocket work; unlike it, it writes
a frame back only once the whole frame has arrived, as a server that
delivers whole messages must.  ``raw_uvloop`` writes every chunk back the
moment it arrives, so with one large message in flight its reply overlaps
the rest of the request (the two directions of the socket run at once),
which no message server can do.  The gap between the two relays on the
large-message scenarios is that overlap; this relay is the ceiling a message
server can reach.

It reads into one buffer (4 KiB at first) that doubles while a frame does
not fit (like a server's message buffer) and parses only the frame headers (RFC 6455 5.2:
7-, 16- or 64-bit length, the mask key).
"""

from __future__ import annotations

import asyncio

import uvloop

from fastws.bench.peers._common import parse_args
from fastws.bench.peers.raw_uvloop import RESPONSE


def frame_end(buf: bytearray, start: int, end: int) -> int:
    """Where the frame beginning at ``start`` ends, or -1 while its header
    or payload is still incomplete in ``buf[start:end]``."""
    if end - start < 2:
        return -1
    n = buf[start + 1] & 0x7F
    head = 2
    if n == 126:
        head = 4
        if end - start < head:
            return -1
        n = int.from_bytes(buf[start + 2 : start + 4], "big")
    elif n == 127:
        head = 10
        if end - start < head:
            return -1
        n = int.from_bytes(buf[start + 2 : start + 10], "big")
    if buf[start + 1] & 0x80:
        head += 4
    stop = start + head + n
    return stop if stop <= end else -1


class WholeEcho(asyncio.BufferedProtocol):
    __slots__ = ("transport", "head", "buf", "view", "fill")

    def connection_made(self, transport):
        self.transport = transport
        self.head = b""
        self.buf = bytearray(4096)
        self.view = memoryview(self.buf)
        self.fill = 0

    def get_buffer(self, sizehint):
        if len(self.buf) - self.fill < 4096:  # double (a new buffer: the loop may hold a view of the old)
            grown = bytearray(2 * len(self.buf))
            grown[: self.fill] = self.view[: self.fill]
            self.buf, self.view = grown, memoryview(grown)
        return self.view[self.fill :]

    def buffer_updated(self, nbytes):
        start = 0
        end = self.fill + nbytes
        if self.head is not None:  # still in the request head
            self.head += bytes(self.view[:end])
            i = self.head.find(b"\r\n\r\n")
            if i < 0:
                self.fill = 0
                return
            rest = self.head[i + 4 :]
            self.head = None
            self.transport.write(RESPONSE)
            self.buf[: len(rest)] = rest
            end = len(rest)
        buf = self.buf
        while True:
            stop = frame_end(buf, start, end)
            if stop < 0:
                break
            self.transport.write(self.view[start:stop])  # uvloop copies what it cannot send at once
            start = stop
        if start:
            rest = end - start
            buf[:rest] = buf[start:end]
            end = rest
        self.fill = end


async def main(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(WholeEcho, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    a = parse_args(__doc__.splitlines()[0])
    uvloop.run(main(a.host, a.port))
