"""The server app of the herd (``python -m fastws.bench.herd``): the room protocol on ``/rt``.

    fastws serve fastws.bench.peers.herd_rooms:app --broker redis+streams://127.0.0.1:6379/0

``app.rooms_endpoint("/rt")`` as the docs show it (rooms in namespace
``/rt``, clients may publish, a resume replays up to 1,000 messages).
"""

import fastws

app = fastws.App()
rt = app.rooms_endpoint("/rt")
