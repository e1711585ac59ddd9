"""The relay app on socketify (Python bindings to uWebSockets), pub/sub fan-out.

``--compression [shared|dedicated]``: permessage-deflate, every message sent
compressed. ``shared`` (CompressOptions.SHARED_COMPRESSOR and
SHARED_DECOMPRESSOR): one compressor for the whole server, no context
takeover, as fastws's default; ``dedicated`` (DEDICATED_COMPRESSOR and
DEDICATED_DECOMPRESSOR): one compressor per connection with context takeover
(smaller frames, more memory and CPU per connection). ``--certfile``/``--keyfile``:
serve TLS (``wss://``, uWebSockets' own OpenSSL layer)."""

from __future__ import annotations

from socketify import App, AppListenOptions, AppOptions, CompressOptions

from fastws.bench.peers._common import MAX_SIZE, parse_args

ROOM = "relay"


COMPRESSION = {
    None: CompressOptions.DISABLED,
    "shared": CompressOptions.SHARED_COMPRESSOR | CompressOptions.SHARED_DECOMPRESSOR,
    "dedicated": CompressOptions.DEDICATED_COMPRESSOR | CompressOptions.DEDICATED_DECOMPRESSOR_32KB,
}


def make_app(compression: str | None = None, certfile: str | None = None, keyfile: str | None = None) -> App:
    app = App(AppOptions(key_file_name=keyfile, cert_file_name=certfile)) if certfile else App()
    compress = compression is not None

    def echo_message(ws, message, opcode):
        ws.send(message, opcode, compress)

    def sub_open(ws):
        ws.subscribe(ROOM)

    def sub_message(ws, message, opcode):
        app.publish(ROOM, message, opcode, compress)  # app.publish reaches the sender too

    common = {
        "compression": COMPRESSION[compression],
        "max_payload_length": MAX_SIZE,
        "max_backpressure": 64 * MAX_SIZE,
        "idle_timeout": 960,
    }
    app.ws("/echo", {**common, "message": echo_message})
    app.ws("/*", {**common, "open": sub_open, "message": sub_message})
    return app


if __name__ == "__main__":
    a = parse_args(__doc__.splitlines()[0], compression=("shared", "dedicated"))
    app = make_app(a.compression, a.certfile, a.keyfile)
    app.listen(AppListenOptions(port=a.port, host=a.host), lambda config: None)
    app.run()
