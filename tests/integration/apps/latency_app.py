"""The app of the per-route delivery-latency test
(tests/integration/test_engine_features.py::test_delivery_latency_per_route).

    /chat   echoes every message; no on_connect, so the Cython engine's C fast
            path upgrades it
    /feed   echoes every message; its on_connect accepts, so the upgrade goes
            through the Python handshake (Connection.accept_upgrade)
"""

import fastws

app = fastws.App()


@app.on_message("/chat")
def chat(conn, data):
    conn.send(data)


@app.on_connect("/feed")
def feed_accept(request):
    return None


@app.on_message("/feed")
def feed(conn, data):
    conn.send(data)
