"""The relay app on ``picows`` (frame-level listener API); ``--certfile``/``--keyfile``: TLS."""

from __future__ import annotations

import uvloop
from picows import WSListener, WSMsgType, WSUpgradeRequest, ws_create_server

from fastws.bench.peers._common import MAX_SIZE, parse_args, server_ssl_context

SUBSCRIBERS: set = set()


class Echo(WSListener):
    def on_ws_frame(self, transport, frame):
        if frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION):
            transport.send(frame.msg_type, frame.get_payload_as_memoryview(), frame.fin)
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()


class Subscriber(WSListener):
    def on_ws_connected(self, transport):
        self.transport = transport
        SUBSCRIBERS.add(transport)

    def on_ws_disconnected(self, transport):
        SUBSCRIBERS.discard(transport)

    def on_ws_frame(self, transport, frame):
        # The load generator never fragments; a fragmented message is relayed frame by frame.
        if frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION):
            payload = frame.get_payload_as_bytes()
            for t in SUBSCRIBERS:
                t.send(frame.msg_type, payload, frame.fin)
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()


def listener_factory(request: WSUpgradeRequest):
    return Echo() if request.path == b"/echo" or request.path == "/echo" else Subscriber()


async def main(host: str, port: int, ssl=None) -> None:
    server = await ws_create_server(listener_factory, host, port, max_frame_size=MAX_SIZE, backlog=4096, ssl=ssl)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    a = parse_args(__doc__.splitlines()[0])
    uvloop.run(main(a.host, a.port, server_ssl_context(a)))
