# Shipped inside the package so that `fastws bench` works outside the repo;
# examples/relay.py re-exports this app.
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


@app.on_open("*")
def subscribe(conn):
    # every connection on a path other than /echo is a subscriber
    conn.join("relay")


@app.on_message("*")
def relay(conn, data):
    # framed once, the same frame queued on every member (sender included)
    app.publish("relay", data)
