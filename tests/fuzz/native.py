"""A coverage-instrumented build of ``fastws._core`` for the fuzz targets.

atheris sees the branches of Python code only; the Cython engine and the C
upgrade parser are native code.  For libFuzzer to see their branches too,
``fastws/_core.pyx`` is compiled once more, with clang and libFuzzer's
coverage instrumentation (``-fsanitize-coverage=...``), into
``build/fuzz-native/`` (never over the in-place ``fastws/_core*.so`` that
the rest of the tree runs on)::

    python -m tests.fuzz.native            # build (or say it is up to date)

and a target run with ``FASTWS_FUZZ_NATIVE=1`` imports that build as
``fastws._core``::

    FASTWS_FUZZ_NATIVE=1 python -m tests.fuzz.frames -max_total_time=600 tests/fuzz/corpus/frames

The build records a hash of the sources (``_core.pyx`` and its ``.pxi``
parts); a stale or missing build is refused with the command to run, so a
run never fuzzes old code.

The instrumentation needs libFuzzer's ``__sanitizer_cov_*`` symbols in the
global namespace, where atheris' built-in libFuzzer (loaded privately, and
only once fuzzing starts) does not put them: the build also links clang's
libFuzzer into ``build/fuzz-native/libfuzzer.so``, which a native run
preloads (atheris then uses it instead of its own).  No sanitizer is linked
(the atheris wheel ships none), so this adds coverage guidance, not ASan.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.fuzz._harness import ROOT

OUT = ROOT / "build" / "fuzz-native"
SO = OUT / "_core_fuzz.so"
#: clang's libFuzzer (no main) as a shared library, preloaded by a native run
LIBFUZZER = OUT / "libfuzzer.so"
STAMP = OUT / "sources.sha256"
#: the compiler directives of setup.py's release build
#: libFuzzer's coverage (what -fsanitize=fuzzer-no-link turns on, less stack-depth)
COVERAGE = "inline-8bit-counters,pc-table,trace-cmp,indirect-calls"
DIRECTIVES = ("boundscheck=False", "wraparound=False", "initializedcheck=False", "cdivision=True",
              "language_level=3")


def sources() -> list:
    return [ROOT / "fastws" / "_core.pyx", *sorted((ROOT / "fastws").glob("_core_*.pxi"))]


def source_hash() -> str:
    h = hashlib.sha256()
    for path in sources():
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def fresh() -> bool:
    return SO.exists() and LIBFUZZER.exists() and STAMP.exists() and STAMP.read_text().strip() == source_hash()


def build() -> Path:
    """Cythonize and compile ``_core.pyx`` with coverage instrumentation."""
    clang = shutil.which("clang")
    if clang is None:
        raise SystemExit("clang is needed for the instrumented build (apt-get install clang)")
    OUT.mkdir(parents=True, exist_ok=True)
    digest = source_hash()       # before cythonizing: a concurrent edit makes the next check stale
    c_file = OUT / "_core.c"
    cmd = [sys.executable, "-m", "cython", "-3", *(f"-X{d}" for d in DIRECTIVES), "fastws/_core.pyx",
           "-o", str(c_file)]
    subprocess.run(cmd, cwd=ROOT, check=True)
    includes = [f"-I{sysconfig.get_paths()['include']}", f"-I{sysconfig.get_paths()['platinclude']}"]
    tmp = SO.with_suffix(".tmp.so")
    subprocess.run([clang, "-shared", "-fPIC", "-O1", f"-fsanitize-coverage={COVERAGE}", "-Wno-unused-function",
                    "-Wno-unreachable-code", *includes, str(c_file), "-o", str(tmp)], check=True)
    archive = subprocess.run([clang, "-print-file-name=libclang_rt.fuzzer_no_main-x86_64.a"],
                             capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.isabs(archive):      # clang prints the bare name when it has no such file
        archive = next(iter(sorted(Path("/usr/lib").glob(
            "llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer_no_main-x86_64.a"))), None)
        if archive is None:
            raise SystemExit("libFuzzer's archive (libclang_rt.fuzzer_no_main) is missing: apt-get install clang")
    subprocess.run([clang + "++", "-shared", "-fPIC", "-o", str(LIBFUZZER), "-Wl,--whole-archive", str(archive),
                    "-Wl,--no-whole-archive", "-lpthread"], check=True)
    tmp.replace(SO)
    STAMP.write_text(digest + "\n")
    return SO


class _Finder(importlib.abc.MetaPathFinder):
    """Resolves ``fastws._core`` to the instrumented build."""

    def find_spec(self, name, path=None, target=None):
        if name != "fastws._core":
            return None
        loader = importlib.machinery.ExtensionFileLoader(name, str(SO))
        return importlib.machinery.ModuleSpec(name, loader, origin=str(SO))


def install() -> None:
    """Make the next ``import fastws._core`` load the instrumented build.

    The build's ``__sanitizer_cov_*`` symbols must come from a libFuzzer in
    the global namespace, loaded before atheris picks its own: without
    ``LIBFUZZER`` in ``LD_PRELOAD`` the process re-executes itself (same
    module, same arguments) with it; atheris then says "Using preloaded
    libfuzzer"."""
    if "fastws._core" in sys.modules:
        raise RuntimeError("fastws._core is imported already")
    stamp = STAMP.read_text().strip() if STAMP.exists() else ""
    # checked once per run: the processes libFuzzer starts for -fork/-merge
    # go on with the build their parent took, even if the sources moved on
    if os.environ.get("FASTWS_FUZZ_NATIVE_STAMP") != stamp or not SO.exists():
        if not fresh():
            raise SystemExit(f"the instrumented fastws._core in {OUT} is missing or older than "
                             "fastws/_core.pyx: run `python -m tests.fuzz.native` first")
        os.environ["FASTWS_FUZZ_NATIVE_STAMP"] = stamp
    preload = os.environ.get("LD_PRELOAD", "")
    if str(LIBFUZZER) not in preload.split(":"):
        main = sys.modules["__main__"]
        module = main.__spec__.name if main.__spec__ is not None else None
        if module is None:
            raise SystemExit("run the target as `python -m tests.fuzz.<target>` (it re-executes itself)")
        env = dict(os.environ, LD_PRELOAD=":".join(filter(None, [str(LIBFUZZER), preload])))
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)
    sys.meta_path.insert(0, _Finder())


if __name__ == "__main__":
    if fresh():
        print(f"{SO} is up to date")
    else:
        print(f"built {build()}")
