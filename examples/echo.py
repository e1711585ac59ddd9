"""Echo every text and binary message back, on every path.

    fastws serve examples.echo:app --port 8000
"""

import fastws

app = fastws.App()


@app.on_message("*")
def echo(conn, data):
    conn.send(data)
