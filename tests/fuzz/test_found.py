"""What the fuzz targets found, as plain unit tests (one per finding).

Each test holds the input a fuzzer reported (minimized by hand where it
helped), so the finding stays checked after its fix whatever the corpus
becomes.  A test here that fails is an open finding, reported with its input.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fastws.core import IMPLEMENTATION  # noqa: E402
from fastws.handshake import HttpRequest, parse_fast, parse_request, parse_wsproto  # noqa: E402
from tests.unit.test_fast_upgrade import PLAIN, head_of  # noqa: E402
from tests.unit.test_handshake import answer  # noqa: E402

# -- publish_body -----------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"[" * 3000, b'{"room": "r", "text": "x", "a":' + b'{"a":' * 1500],
                         ids=["array", "object"])
def test_publish_json_nested_past_the_recursion_limit_is_a_bad_request(body):
    """json.loads raised RecursionError, which escaped ``_message`` (the
    server answered 500 and logged a traceback) instead of a 400."""
    from fastws import publish_api

    request = HttpRequest("POST", "/publish", "room=r", [("content-type", "application/json")], body)
    with pytest.raises(publish_api._BadRequest, match="nested too deeply"):
        publish_api._message(request, need_room=True)


# -- upgrade ---------------------------------------------------------------------------------

#: found by the upgrade target (crash-ce40da06..., crash-ec5e6298...), then by hand:
#: message framing headers that h11 (so wsproto, which defines the
#: semantics) refuses with 400, while the fast paths did not look at them
FRAMING_HEADERS = [
    "Transfer-Encoding: gzip",
    "transfer-encoding:1]:9000",
    "Content-Length: x",
    "Content-Length: -1",
]


@pytest.mark.parametrize("line", FRAMING_HEADERS)
def test_fast_paths_refuse_bad_framing_headers_as_wsproto_does(line):
    head = head_of(PLAIN + [line])
    expected = answer(parse_wsproto, head)
    assert expected[0] == "reject" and expected[1] == 400, expected
    fast = answer(parse_fast, head)
    assert fast is None or fast == expected, f"parse_fast: {fast}, wsproto: {expected}"
    assert answer(parse_request, head) == expected
    if IMPLEMENTATION == "cython":
        from fastws import _core

        assert _core._fast_accept_for_test(head) is None, "the C path answers 101 where wsproto answers 400"


def test_fast_path_rejection_matches_wsproto_with_transfer_encoding_and_no_version():
    """The first input the upgrade target reported: no Sec-WebSocket-Version
    and a Transfer-Encoding header; parse_fast answered 400 with
    ``Sec-WebSocket-Version: 13``, wsproto 400 without it."""
    head = (b"GET /chat?room=1 HTTP/1.1\r\nhost:example.com\r\nUPGRADE:\tWebSocket\r\nconnection:  upgrade\r\n"
            b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ== \r\nsec-websocket-versinnection:  upgrade\r\n"
            b"transfer-encoding: dGhlIHNhbXBsZSBub25jZQ== \r\nsec-websocket-versionon:13\r\n\r\n")
    fast = answer(parse_fast, head)
    assert fast is None or fast == answer(parse_wsproto, head)


# -- broker_wire -------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 2999, 5000, 65535])
def test_broker_close_payload_with_a_code_no_server_sends_is_malformed(code):
    """Found while extending the broker_wire target to CLOSE payloads:
    ``unpack_close`` returns any u16 as the code, and the bridge then calls
    ``conn.close(code, reason)``, which raises ValueError for a code no
    server may send; ``Broker._deliver`` logs that as "broker message
    handler failed" with a traceback, the asking node gets no REPLY (its
    HTTP client a 504), and the payload is not counted as malformed.  The
    HTTP API only packs 1000-1003, 1007-1014 and 3000-4999: another code
    comes from a foreign or broken publisher."""
    from fastws.broker import wire
    from fastws.errors import BrokerProtocolError

    payload = wire.pack_close(7, 1, code, "x")
    with pytest.raises(BrokerProtocolError):
        wire.unpack_close(payload)
