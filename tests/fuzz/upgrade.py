"""Fuzz target ``upgrade``: the C fast upgrade path against the Python parsers.

Run: ``python -m tests.fuzz.upgrade -max_total_time=600 tests/fuzz/corpus/upgrade``

An input is a request head as a client sends it.  The head handed to the
parsers is what the hub hands over: up to and including the first blank
line (``\\r\\n\\r\\n`` is appended when there is none).

For every head:

* ``fastws._core._fast_accept_for_test(head, mode)`` (the C path, in each
  origin mode ``*``, ``same-host``, ``none``) raises nothing; whatever it
  takes, ``parse_request`` accepts with the same path and query and
  ``accept_response`` writes the identical 101 bytes, and the origin policy
  of that mode allows the request (``tests/unit/test_fast_upgrade.py``'s
  ``python_answer`` is the comparison);
* ``parse_fast``, ``parse_wsproto`` and ``parse_request`` raise nothing but
  ``HandshakeError`` (with a 4xx status); where ``parse_fast`` answers, its
  answer is wsproto's (``tests/unit/test_handshake.py``'s ``answer``), and
  ``parse_request`` answers as ``parse_fast`` when it answers, else as
  ``parse_wsproto``.
"""

from __future__ import annotations

from tests.fuzz import _harness

with _harness.instrumented(__name__ == "__main__", "fastws", "wsproto", "h11"):
    from fastws import _core
    from fastws.handshake import parse_fast, parse_request, parse_wsproto
    from fastws.origins import OriginPolicy

# the differential comparisons of the unit tests (after the instrumented imports)
from tests.unit.test_fast_upgrade import python_answer
from tests.unit.test_handshake import answer

#: the C path's origin modes, and the Python policy each one stands for
POLICIES = {"*": None, "same-host": OriginPolicy("same-host"), "none": OriginPolicy("https://app.example.com")}


def head_of(data: bytes) -> bytes:
    """What the hub hands to the handshake: up to the first blank line."""
    end = data.find(b"\r\n\r\n")
    return data + b"\r\n\r\n" if end < 0 else data[: end + 4]


#: a Content-Length or Transfer-Encoding header line


def TestOneInput(data: bytes) -> None:
    head = head_of(data)
    answers = {}
    for parser in (parse_fast, parse_wsproto, parse_request):
        got = answer(parser, head)      # a HandshakeError is an answer; anything else raises
        if got is not None and got[0] == "reject":
            assert 400 <= got[1] < 500, f"{parser.__name__}: status {got[1]} for {head!r}"
        answers[parser.__name__] = got
    fast, wsproto_answer = answers["parse_fast"], answers["parse_wsproto"]
    if fast is None:        # declined: parse_request is wsproto's answer
        assert answers["parse_request"] == wsproto_answer, head
    else:
        assert answers["parse_request"] == fast, head
        assert fast == wsproto_answer, f"parse_fast and wsproto disagree on {head!r}:\n{fast}\n{wsproto_answer}"

    py = None
    for mode, policy in POLICIES.items():
        taken = _core._fast_accept_for_test(head, mode)
        if taken is None:
            continue
        path, query, response, _ext = taken
        if py is None:
            py = python_answer(head)
        assert py == ("accept", path, query, response), f"C path took {head!r} in mode {mode}:\n{taken}\n{py}"
        if policy is not None:
            assert policy.allows_request(parse_request(head)), f"C path took {head!r} in mode {mode}"


if __name__ == "__main__":
    _harness.main(TestOneInput)
