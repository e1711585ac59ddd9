"""The neutral benchmark app: echo on ``/echo``, relay everywhere else.

    fastws serve examples.relay:app --port 8000

On ``/echo`` every text or binary message is sent back unchanged (same
opcode: ``str`` stays text, ``bytes`` stays binary). On any other path the
connection is a subscriber: a message from any client is relayed to every
connected subscriber, the sender included (a publisher counts its own copy
as an acknowledgement). ``fastws bench`` runs this app against the same app
written for each peer (``fastws/bench/peers/``).
"""

import fastws

app = fastws.App()


@app.on_message("/echo")
def echo(conn, data):
    conn.send(data)


@app.on_message("*")
def relay(conn, data):
    # TODO(rooms): once rooms land, join every subscriber to one room on
    # connect and replace this with app.publish(room, data). Until then the
    # subscribers are the open connections whose path is not /echo, and
    # app.broadcast frames the message once and queues it on each of them.
    app.broadcast(data, [c for c in app.connections.values() if c.path != "/echo"])
