"""The relay app on ``websockets`` (new asyncio API), fan-out with ``broadcast``.

``--compression``: permessage-deflate with websockets' defaults
(``compression="deflate"``: context takeover, server_max_window_bits=12,
memLevel 5; ``broadcast`` compresses for each connection).
``--certfile``/``--keyfile``: serve TLS (``wss://``)."""

from __future__ import annotations

import uvloop
from websockets.asyncio.server import broadcast, serve

from fastws.bench.peers._common import MAX_SIZE, parse_args, server_ssl_context

SUBSCRIBERS: set = set()


async def handler(ws):
    if ws.request.path == "/echo":
        async for message in ws:
            await ws.send(message)
        return
    SUBSCRIBERS.add(ws)
    try:
        async for message in ws:
            broadcast(SUBSCRIBERS, message)
    finally:
        SUBSCRIBERS.discard(ws)


async def main(host: str, port: int, compression: str | None = None, ssl=None) -> None:
    async with serve(
        handler, host, port, compression=compression, max_size=MAX_SIZE,
        ping_interval=None, backlog=4096, ssl=ssl,
    ) as server:
        await server.serve_forever()


if __name__ == "__main__":
    a = parse_args(__doc__.splitlines()[0], compression=("deflate",))
    uvloop.run(main(a.host, a.port, a.compression, server_ssl_context(a)))
