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
"""

import glob
import os

from setuptools import Extension, setup

NO_EXTENSIONS = os.environ.get("FASTWS_NO_EXTENSIONS") == "1"
DEBUG = os.environ.get("FASTWS_DEBUG") == "1"
NO_COUNTERS = os.environ.get("FASTWS_NO_COUNTERS") == "1"

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
