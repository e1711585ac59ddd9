"""The relay app on ``aiohttp`` (``web.WebSocketResponse``).

``--compression``: ``compress=True`` (permessage-deflate with aiohttp's
defaults: each connection compresses for itself). ``--certfile``/``--keyfile``:
serve TLS (``wss://``)."""

from __future__ import annotations

import asyncio

import uvloop
from aiohttp import WSMsgType, web

from fastws.bench.peers._common import MAX_SIZE, parse_args, server_ssl_context

SUBSCRIBERS: set = set()
COMPRESS = False


async def echo(request):
    ws = web.WebSocketResponse(compress=COMPRESS, max_msg_size=MAX_SIZE, autoping=True)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def subscriber(request):
    ws = web.WebSocketResponse(compress=COMPRESS, max_msg_size=MAX_SIZE, autoping=True)
    await ws.prepare(request)
    SUBSCRIBERS.add(ws)
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                for s in list(SUBSCRIBERS):
                    if not s.closed:
                        await s.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                for s in list(SUBSCRIBERS):
                    if not s.closed:
                        await s.send_bytes(msg.data)
    finally:
        SUBSCRIBERS.discard(ws)
    return ws


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/echo", echo)
    app.router.add_get("/{tail:.*}", subscriber)
    return app


if __name__ == "__main__":
    a = parse_args(__doc__.splitlines()[0], compression=("deflate",))
    COMPRESS = a.compression is not None
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(make_app(), host=a.host, port=a.port, access_log=None, print=None, backlog=4096,
                ssl_context=server_ssl_context(a))
