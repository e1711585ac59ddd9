"""Fuzz target ``publish_body``: the HTTP API's request parsers.

Run: ``python -m tests.fuzz.publish_body -max_total_time=600 tests/fuzz/corpus/publish_body``

An input is three parts split at the first two newlines::

    <Content-Type header value>\n<query string>\n<body ...>

(the first two decoded as latin-1, as both fronts decode header values and
the ASGI front the query string; a missing part is empty, an empty
Content-Type line means no header).  The parsers of ``fastws.publish_api``
read the request, and the only exception that may come out of any of them
is ``_BadRequest`` (the 400 answer):

* ``_message``, as ``POST /publish`` (``need_room=True``) and as ``POST
  /connections/{id}`` (``need_room=False``): the room (when needed) is a
  non-empty str, the namespace a str, both encode to UTF-8, and the message
  is bytes or a str that encodes to UTF-8 (it goes into a text frame);
* ``_close_args``, as ``DELETE /connections/{id}``: a close code a server
  may send and a str reason of at most 123 bytes of UTF-8;
* ``_room_query``, as ``GET /presence`` and ``GET /history``: a non-empty
  room and a namespace, both str that encode to UTF-8.

The same Content-Type line is also read as an ``Authorization`` header by
``_bearer`` (None or the token's bytes, never an exception).  (The API
no longer looks at the Content-Type: every body is JSON; the line stays in
the input format so that old corpus entries keep their meaning.)
"""

from __future__ import annotations

from tests.fuzz import _harness

with _harness.instrumented(__name__ == "__main__", "fastws"):
    from fastws import publish_api
    from fastws.handshake import HttpRequest


def request_of(data: bytes) -> HttpRequest:
    ctype, _, rest = data.partition(b"\n")
    query, _, body = rest.partition(b"\n")
    headers = [("content-type", ctype.decode("latin-1"))] if ctype else []
    return HttpRequest("POST", "/publish", query.decode("latin-1"), headers, body)


def _check_text(value, what: str) -> None:
    assert isinstance(value, str), f"{what} is {type(value).__name__}, not str"
    value.encode("utf-8")      # UnicodeEncodeError: a lone surrogate got through


def TestOneInput(data: bytes) -> None:
    request = request_of(data)
    for need_room in (True, False):
        try:
            room, ns, message = publish_api._message(request, need_room=need_room)
        except publish_api._BadRequest:
            continue
        if need_room:
            _check_text(room, "the room")
            assert room, "an empty room name was accepted"
        _check_text(ns, "the namespace")
        if isinstance(message, str):
            _check_text(message, "a text message")
        else:
            assert isinstance(message, bytes), f"the message is {type(message).__name__}"
    try:
        code, reason = publish_api._close_args(request)
    except publish_api._BadRequest:
        pass
    else:
        assert isinstance(code, int) and not isinstance(code, bool), f"close code {code!r}"
        assert 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999, f"close code {code}"
        _check_text(reason, "the close reason")
        assert len(reason.encode("utf-8")) <= 123, f"a close reason of {len(reason.encode())} bytes"
    try:
        room, ns = publish_api._room_query(request)
    except publish_api._BadRequest:
        pass
    else:
        _check_text(room, "the queried room")
        assert room, "an empty room name was accepted"
        _check_text(ns, "the queried namespace")
    token = publish_api._bearer(request.header("content-type"))
    assert token is None or isinstance(token, bytes)


if __name__ == "__main__":
    _harness.main(TestOneInput)
