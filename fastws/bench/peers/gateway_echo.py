"""One application, written three ways, for ``fastws bench --gateway``: a message comes back to its sender.

* ``handle`` - the gateway handler (``handle(event, api)``): run by Streams
  workers (``python -m fastws.gateway fastws.bench.peers.gateway_echo:handle
  --url redis://...``) and, as ``backend`` (a :class:`fastws.gateway.GatewayApp`,
  taking batches), under uvicorn behind ``fastws serve --gateway http://...``;
* ``app`` - the same in process: a :class:`fastws.App` whose ``on_message``
  sends the message back (``fastws serve fastws.bench.peers.gateway_echo:app``);
* ``python -m fastws.bench.peers.gateway_echo --port N`` - the same on
  python-socketio (``AsyncServer`` on aiohttp and uvloop, WebSocket transport
  only): a ``msg`` event is emitted back to its sender
  (``sio.emit("msg", data, to=sid)``), so the reply frame is the frame sent.
"""

from __future__ import annotations

import fastws
from fastws.bench.peers._common import parse_args
from fastws.gateway import GatewayApp


def handle(event, api):
    """The gateway handler: a message's reply is the message."""
    if event.type == "message":
        return event.data
    return None


backend = GatewayApp(handle, batch=1000)

app = fastws.App()


@app.on_message("*")
def echo(conn, data):
    conn.send(data)


def main() -> None:
    import asyncio

    import socketio
    import uvloop
    from aiohttp import web

    a = parse_args(__doc__.splitlines()[0])
    sio = socketio.AsyncServer(async_mode="aiohttp", transports=["websocket"], http_compression=False,
                               ping_interval=300, ping_timeout=300, async_handlers=False)

    @sio.on("msg")
    async def msg(sid, data):
        await sio.emit("msg", data, to=sid)

    web_app = web.Application()
    sio.attach(web_app)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(web_app, host=a.host, port=a.port, access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
