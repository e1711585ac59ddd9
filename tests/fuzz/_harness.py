"""Plumbing shared by the fuzz targets: instrumented imports and the atheris
entry point.

A target module does::

    from tests.fuzz import _harness

    with _harness.instrumented(__name__ == "__main__", "fastws", "wsproto"):
        from fastws import ...          # the code under test, instrumented

    def TestOneInput(data: bytes) -> None: ...

    if __name__ == "__main__":
        _harness.main(TestOneInput)

Imported by the suite (``test_fuzz.py``) the module is plain Python: no
atheris, no instrumentation, ``TestOneInput`` is called on each corpus file.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: the repository root (``python -m tests.fuzz.<target>`` runs from here)
ROOT = HERE.parents[1]
#: ``CORPUS / <target>``: the corpus kept in the repository
CORPUS = HERE / "corpus"
#: the targets, by module name (``tests.fuzz.<name>``), in the order the suite runs them
TARGETS = ("frames", "upgrade", "publish_body", "broker_wire")


def instrumented(enabled: bool, *packages: str):
    """A context manager: modules of ``packages`` imported inside it get
    atheris' coverage instrumentation when ``enabled`` (the target runs as a
    fuzzer); a no-op otherwise.  The packages must not be imported yet.

    With ``FASTWS_FUZZ_NATIVE=1`` the Cython extension is the
    coverage-instrumented build of :mod:`tests.fuzz.native` (the process
    re-executes itself once with that build's libFuzzer preloaded)."""
    if not enabled:
        return contextlib.nullcontext()
    if os.environ.get("FASTWS_FUZZ_NATIVE") == "1":
        from tests.fuzz import native

        native.install()
    import atheris

    already = [p for p in packages if p in sys.modules]
    if already:
        raise RuntimeError(f"imported before instrumentation, atheris would not see them: {already}")
    return atheris.instrument_imports(include=list(packages))


def main(test_one_input) -> None:
    """Run ``test_one_input`` under atheris with libFuzzer's command line
    (``sys.argv``: corpus directories, ``-max_total_time=``, ``-merge=1`` ...)."""
    import atheris

    argv = list(sys.argv)
    spec = sys.modules["__main__"].__spec__
    if spec is not None:
        # libFuzzer re-runs argv[0] through the shell for -merge, -fork and
        # -minimize_crash: make that this same module, not the bare .py file
        argv[0] = f"{shlex.quote(sys.executable)} -m {spec.name}"
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
