"""Coverage-guided fuzz targets (atheris) for everything that parses bytes
from the network.

One module per target, each exposing ``TestOneInput(data: bytes)`` and
runnable by hand for long runs::

    python -m tests.fuzz.frames -max_total_time=600 tests/fuzz/corpus/frames
    python -m tests.fuzz.upgrade -max_total_time=600 tests/fuzz/corpus/upgrade
    python -m tests.fuzz.publish_body -max_total_time=600 tests/fuzz/corpus/publish_body
    python -m tests.fuzz.broker_wire -max_total_time=600 tests/fuzz/corpus/broker_wire

(from the repository root).  libFuzzer writes new interesting inputs into
the first corpus directory it is given and a crashing input to
``crash-<sha1>`` (``-artifact_prefix=DIR/`` to put it elsewhere).

* ``frames``: the Cython frame engine against the wsproto twin on the same
  bytes (limits, deflate, chunking and a server action chosen by the first
  bytes); same events, same bytes to send, memory within the limit.
* ``upgrade``: the C fast upgrade path against the Python handshake parsers.
* ``publish_body``: the HTTP publish API's body/query parser.
* ``broker_wire``: every unpack function of :mod:`fastws.broker.wire`.

``corpus/<target>/`` holds the seeds (``seed-*``, written by
``python -m tests.fuzz.seeds``) and the inputs a longer run found that add
coverage (named by their SHA-1, as libFuzzer names them; kept with
``python -m tests.fuzz.merge <target> RUN_DIR``).  ``test_fuzz.py`` replays
every corpus file through its target (plain Python, no instrumentation) and
runs each target under atheris for a few seconds; ``test_found.py`` holds
what the fuzzers found, one unit test per finding.

atheris instruments Python code only.  For long runs of the targets that
reach the Cython extension (``frames``, ``upgrade``), build a copy of it
with libFuzzer's coverage instrumentation (``python -m tests.fuzz.native``,
needs clang) and run with ``FASTWS_FUZZ_NATIVE=1``: libFuzzer then sees the
branches of the C engine and the C upgrade parser as well.

Nothing in this package imports fastws at package import time: a target
run as ``__main__`` imports the code under test inside
:func:`_harness.instrumented` so that atheris sees its branches.
"""
