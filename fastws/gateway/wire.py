"""What the gateway and its backend say to each other: events out, answers back.

Both transports carry the same JSON objects (UTF-8):

an **event** (the gateway -> the backend) ::

    {"type": "connect" | "message" | "disconnect",
     "id": "<node id>-e<n>",          # unique per gateway process: a retried event keeps it
     "connection_id": "<node id>-<n>", # what POST /connections/{id} and api.post_to_connection take
     "route": "/chat",                 # the WebSocket path
     "node": "<node id>",              # the gateway node that holds the connection
     "user": "u1",                     # message, disconnect: the user the connect answer named
     # connect only:
     "headers": {"name": "value", ...},   # lower-case names; repeated ones joined with ", "
     "query": {"k": "v", ...},            # first value of each parameter
     "query_string": "k=v&...",
     "cookies": {"name": "value", ...},
     "subprotocols": ["chat.v1", ...],    # what the client offered
     "remote_address": "127.0.0.1",
     # message only: the payload
     "text": "..."  or  "base64": "...",  # a text message, or a binary one base64-encoded
     # disconnect only:
     "code": 1000, "reason": "..."}       # 1006 when the client vanished without a close frame

an **answer** (the backend -> the gateway), every field optional::

    {"accept": true,                 # connect: false refuses the upgrade
     "status": 403, "reason": "...", # connect refused: the HTTP status (400..599) and body
     "subprotocol": "chat.v1",       # connect: one of the offered subprotocols
     "user": "u1",                   # connect: the connection's user (conn.store["user_id"], presence)
     "reply": {"text": "..."},       # to this connection: one message or a list of them
     "join": ["room", ...],          # this connection joins / leaves rooms (the route's namespace)
     "leave": ["room", ...],
     "send": [{"connection_id": "...", "text": "..."}, ...],          # to any connection, any node
     "publish": [{"room": "...", "namespace": "", "text": "...",
                  "exclude": "<connection id>"}, ...],                 # to a room, every node
     "disconnect": [{"connection_id": "...", "code": 4000, "reason": "..."}, ...],
     "close": {"code": 4000, "reason": "..."}}                          # this connection

A message is ``{"text": str}`` or ``{"base64": str}`` (binary), as in the
HTTP API; a bare JSON string is text.  They are carried out in this order:
join, reply, send, publish, leave, disconnect, close.

HTTP: one event is the body of a ``POST`` to the backend URL and its answer
the body of a ``200``.  A backend that takes several events per request says
so with the answer header ``Fastws-Gateway-Batch: N`` (the most it takes);
from then on a request may carry ``{"events": [event, ...]}`` and its answer
is ``{"results": [answer, ...]}``, in the same order.  ``503`` means "not
processed, try again"; any other status than 200 is a failure of the
events it carried.  With ``--gateway-token`` every request carries
``Authorization: Bearer <token>``.

Redis Streams: an entry of the events stream has the fields ``e`` (a JSON
array of events) and ``r`` (the stream the answers go to: the gateway
node's own); the answer is an entry of that stream with ``i`` (the event
entry's id) and ``a`` (a JSON array of answers, same order).  The events
of one connection are in one entry at a time, so they are handled in order.
"""

from __future__ import annotations

import base64
import binascii
import json
from json.encoder import encode_basestring

#: the answer header by which an HTTP backend takes batches (its value: the most events per request)
BATCH_HEADER = "fastws-gateway-batch"
#: the default stream and consumer group of the Streams transport
DEFAULT_STREAM = "fastws:gateway"
DEFAULT_GROUP = "fastws"
CONNECT, MESSAGE, DISCONNECT = "connect", "message", "disconnect"
EVENT_TYPES = (CONNECT, MESSAGE, DISCONNECT)
#: the close codes a server may send (what a "close"/"disconnect" answer may ask for)
MAX_REASON = 123

__all__ = ["BATCH_HEADER", "DEFAULT_STREAM", "DEFAULT_GROUP", "EVENT_TYPES", "CONNECT", "MESSAGE",
           "DISCONNECT", "AnswerError", "data_fields", "message_of", "message_json", "reply_stream",
           "valid_close_code", "batch_body", "results_of"]


class AnswerError(ValueError):
    """An answer the gateway cannot carry out (the field and what is wrong)."""


def data_fields(message) -> str:
    """The JSON fields of a message: ``"text":"..."`` or ``"base64":"..."``."""
    if type(message) is str:
        return '"text":' + encode_basestring(message)
    return '"base64":"' + base64.b64encode(message).decode("ascii") + '"'


def message_json(message) -> dict:
    """``{"text": ...}`` or ``{"base64": ...}`` of a str or bytes message."""
    if isinstance(message, str):
        return {"text": message}
    if isinstance(message, (bytes, bytearray, memoryview)):
        return {"base64": base64.b64encode(bytes(message)).decode("ascii")}
    raise TypeError(f"a message is str (text) or bytes (binary), got {type(message).__name__}")


def message_of(obj, what: str = "message"):
    """The message (str or bytes) of ``{"text": ...}``, ``{"base64": ...}``
    or a bare string; AnswerError otherwise."""
    if type(obj) is str:
        return obj
    if type(obj) is dict:
        text = obj.get("text")
        if type(text) is str:
            return text
        b64 = obj.get("base64")
        if type(b64) is str:
            try:
                return base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                raise AnswerError(f"{what}: base64 is not valid base64") from None
    raise AnswerError(f"{what}: give {{\"text\": str}} or {{\"base64\": str}}")


def valid_close_code(code) -> bool:
    """A close code a server may send (1000-1003, 1007-1014, 3000-4999)."""
    return type(code) is int and (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999)


def reply_stream(stream: str, node_id: str) -> str:
    """The stream the answers to node ``node_id``'s events go to."""
    return f"{stream}:replies:{node_id}"


def batch_body(frags: list) -> str:
    """``{"events": [...]}`` of event texts."""
    return '{"events":[' + ",".join(frags) + "]}"


def results_of(body, n: int, batched: bool) -> list:
    """The ``n`` answers of a response body (one answer, or ``{"results":
    [...]}`` for a batch); AnswerError when it is not that."""
    try:
        obj = json.loads(body) if body else {}
    except (ValueError, RecursionError):
        raise AnswerError("the answer is not JSON") from None
    if not batched:
        if type(obj) is not dict:
            raise AnswerError("an answer is a JSON object")
        return [obj]
    results = obj.get("results") if type(obj) is dict else None
    if type(results) is not list or len(results) != n:
        raise AnswerError(f'a batch answer is {{"results": [...]}} with {n} answers')
    return results
