"""Peer servers for ``fastws bench``: the same relay app on every library.

Each Python peer is a module run as ``python -m fastws.bench.peers.NAME
--host H --port P``; Node's ``ws`` peer is ``node ws_relay.js PORT HOST``.
On path ``/echo`` every text or binary message is sent back unchanged with
the same opcode; on any other path the connection is a subscriber and each
message is relayed to every connected subscriber, the sender included.
Compression is off everywhere; size limits allow 16 MiB messages.
"""
