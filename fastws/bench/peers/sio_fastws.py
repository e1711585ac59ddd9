"""The Socket.IO relay on fastws.socketio, the same app as ``socketio_relay.py`` and ``socketio_relay.js``.

    fastws serve fastws.bench.peers.sio_fastws:app --port 9001 [--broker redis://...]

Every client joins the room ``relay`` on connect; a ``msg`` event from any
client is emitted to the whole room, the sender included (its own copy is
the load generator's acknowledgement); an ``echo`` event is answered through
its ack with the same data.

Engine.IO pings every 300 s (as the other two relays in ``fastws bench``): a
saturated fan-out run keeps seconds of deliveries queued for the load
generator's subscribers, and a ping answered behind them would close them
with "ping timeout" (the server doing its job, the measurement lost).
"""

import fastws
import fastws.socketio

ROOM = "relay"

sio = fastws.socketio.Server(max_http_buffer_size=16 * 1024 * 1024, ping_interval=300, ping_timeout=300)


@sio.event
def connect(sid, environ):
    sio.enter_room(sid, ROOM)


@sio.event
def msg(sid, data):
    sio.emit("msg", data, to=ROOM)


@sio.event
def echo(sid, data):
    return data


app = fastws.App()
sio.attach(app)
