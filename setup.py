"""Build the one native piece of fastws: ``fastws/_core.pyx``.

``_core.pyx`` ``include``s its parts, ``fastws/_core_*.pxi`` (shipped in
the sdist as package data; Cython tracks them, so editing one rebuilds).

Metadata lives in pyproject.toml.  Environment switches:

* ``FASTWS_NO_EXTENSIONS=1`` - skip the extension; fastws then runs on the
  wsproto-backed engine (``fastws.core.IMPLEMENTATION == "wsproto"``).
* ``FASTWS_DEBUG=1`` - bounds/wraparound checks on, line tracing for coverage,
  and a ``cython -a`` HTML annotation next to the source.
* ``FASTWS_NO_COUNTERS=1`` - compile the per-message counters out (the
  metrics then show zero messages and bytes): only for ``bench/counters.py``,
  which measures what counting costs.

Every build writes ``fastws/_build_info.json`` (git-ignored, shipped as
package data): the git commit the build was made from (``-dirty`` when
tracked files had changes), or, outside a git checkout (a build from an
sdist), the record the sdist carries, else ``null``.  ``fastws --version``
and ``fastws bench`` read it through :func:`fastws.version.build_info`.
"""

import datetime
import glob
import json
import os
import subprocess

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(HERE, "fastws", "_build_info.json")


def _git(*args):
    """Output of ``git args`` in this checkout, or None (no git, not a checkout)."""
    try:
        r = subprocess.run(["git", "-C", HERE, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def write_build_info():
    """Record the commit this build is made from in fastws/_build_info.json."""
    top = _git("rev-parse", "--show-toplevel")
    commit = _git("rev-parse", "HEAD") if top and os.path.samefile(top, HERE) else None
    if commit is None and os.path.exists(BUILD_INFO):
        return                          # an sdist's own record: keep it
    if commit is not None and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    info = {
        "commit": commit,
        "source": "git" if commit else "not built from a git checkout",
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "extension": not NO_EXTENSIONS,
    }
    with open(BUILD_INFO, "w") as fh:
        json.dump(info, fh, indent=1)
        fh.write("\n")


NO_EXTENSIONS = os.environ.get("FASTWS_NO_EXTENSIONS") == "1"
DEBUG = os.environ.get("FASTWS_DEBUG") == "1"
NO_COUNTERS = os.environ.get("FASTWS_NO_COUNTERS") == "1"
write_build_info()

ext_modules = []
if not NO_EXTENSIONS:
    from Cython.Build import cythonize

    directives = {
        "language_level": "3",
        "boundscheck": DEBUG,
        "wraparound": DEBUG,
        "initializedcheck": DEBUG,
        "cdivision": True,
        "embedsignature": True,
    }
    macros = []
    if DEBUG:
        directives["linetrace"] = True
        macros.append(("CYTHON_TRACE_NOGIL", "1"))
    if NO_COUNTERS:
        macros.append(("FASTWS_COUNTERS", "0"))
    ext_modules = cythonize(
        [
            Extension(
                "fastws._core",
                ["fastws/_core.pyx"],
                depends=sorted(glob.glob("fastws/_core_*.pxi")),
                extra_compile_args=["-O3"] if not DEBUG else ["-O0", "-g"],
                define_macros=macros,
            )
        ],
        compiler_directives=directives,
        annotate=DEBUG,
    )
    print("fastws: building the Cython engine (fastws._core)")
else:
    print("fastws: FASTWS_NO_EXTENSIONS=1, pure-Python build (wsproto engine)")

setup(ext_modules=ext_modules)
