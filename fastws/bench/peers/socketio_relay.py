"""The relay app on python-socketio: ``AsyncServer`` + ``AsyncRedisManager``.

    python -m fastws.bench.peers.socketio_relay --port 9001 --channel bench-1

The same relay as ``examples/relay.py``, written the way python-socketio's
documentation writes a multi-node app: every client joins one room on
connect; a ``msg`` event from any client is emitted to the whole room, the
sender included (``sio.emit("msg", data, room=...)``), so the payload comes
back as it was sent (a ``str`` as a text event, ``bytes`` as a binary
attachment). With ``AsyncRedisManager`` the emit is delivered to this node's
members at once and published on the Redis channel, from which every other
node delivers it to its own members.

Events of one client are handled in order (``async_handlers=False``,
python-socketio's documented switch): with its default (a task per event)
the Redis publishes of one client's messages run concurrently on pooled
connections and the other nodes receive them out of order, which the load
generator counts as a failure (``--async-handlers`` restores the default).

Served by aiohttp (``async_mode="aiohttp"``, uvloop), WebSocket transport
only (no long-polling, so no upgrade dance), HTTP compression off; the load
generator offers no permessage-deflate, so frames are never compressed.
``--server uvicorn`` serves the same server as an ASGI app under uvicorn
(websockets, httptools, uvloop) instead.
"""

from __future__ import annotations

import argparse
import asyncio
import resource

import socketio
import uvloop

from fastws.bench.peers._common import MAX_SIZE

ROOM = "relay"


def make_server(redis_url: str, channel: str, async_mode: str, ping_interval: float, ping_timeout: float,
                async_handlers: bool) -> socketio.AsyncServer:
    sio = socketio.AsyncServer(
        async_mode=async_mode,
        client_manager=socketio.AsyncRedisManager(redis_url, channel=channel) if redis_url != "none" else None,
        transports=["websocket"],
        http_compression=False,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        async_handlers=async_handlers,
        max_http_buffer_size=MAX_SIZE,
    )

    @sio.event
    async def connect(sid, environ):
        await sio.enter_room(sid, ROOM)

    @sio.on("msg")
    async def msg(sid, data):
        await sio.emit("msg", data, room=ROOM)

    @sio.on("echo")
    async def echo(sid, data):
        return data      # answered through the client's ack

    return sio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0",
                   help="Redis URL of the AsyncRedisManager ('none': one node, no manager)")
    p.add_argument("--channel", default="socketio", help="Redis channel (unique per benchmark run)")
    p.add_argument("--server", choices=("aiohttp", "uvicorn"), default="aiohttp")
    p.add_argument("--ping-interval", type=float, default=25.0, help="Engine.IO ping interval, seconds")
    p.add_argument("--ping-timeout", type=float, default=20.0, help="Engine.IO ping timeout, seconds")
    p.add_argument("--async-handlers", action="store_true",
                   help="python-socketio's default: each event handled in its own task; then one client's "
                        "messages can reach the other nodes out of order (concurrent Redis publishes)")
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if a.server == "aiohttp":
        from aiohttp import web

        sio = make_server(a.redis, a.channel, "aiohttp", a.ping_interval, a.ping_timeout, a.async_handlers)
        app = web.Application()
        sio.attach(app)
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        web.run_app(app, host=a.host, port=a.port, access_log=None, print=None, backlog=4096)
    else:
        import uvicorn

        sio = make_server(a.redis, a.channel, "asgi", a.ping_interval, a.ping_timeout, a.async_handlers)
        uvicorn.run(socketio.ASGIApp(sio), host=a.host, port=a.port, loop="uvloop", http="httptools",
                    ws="websockets", ws_per_message_deflate=False, ws_ping_interval=None,
                    log_level="warning", access_log=False, backlog=4096)


if __name__ == "__main__":
    main()
