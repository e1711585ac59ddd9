"""The relay app on socketify (Python bindings to uWebSockets), pub/sub fan-out."""

from __future__ import annotations

from socketify import App, AppListenOptions, CompressOptions

from fastws.bench.peers._common import MAX_SIZE, parse_args

ROOM = "relay"


def make_app() -> App:
    app = App()

    def echo_message(ws, message, opcode):
        ws.send(message, opcode)

    def sub_open(ws):
        ws.subscribe(ROOM)

    def sub_message(ws, message, opcode):
        app.publish(ROOM, message, opcode)  # app.publish reaches the sender too

    common = {
        "compression": CompressOptions.DISABLED,
        "max_payload_length": MAX_SIZE,
        "max_backpressure": 64 * MAX_SIZE,
        "idle_timeout": 960,
    }
    app.ws("/echo", {**common, "message": echo_message})
    app.ws("/*", {**common, "open": sub_open, "message": sub_message})
    return app


if __name__ == "__main__":
    a = parse_args(__doc__.splitlines()[0])
    app = make_app()
    app.listen(AppListenOptions(port=a.port, host=a.host), lambda config: None)
    app.run()
