"""The neutral benchmark app: echo on ``/echo``, relay everywhere else.

    fastws serve examples.relay:app --port 8000

The app itself ships inside the package (``fastws/bench/peers/fastws_relay.py``)
so that ``fastws bench`` works outside this repository; this module is the
same app under the name the README and the issues use.
"""

from fastws.bench.peers.fastws_relay import app  # noqa: F401  (re-exported)
