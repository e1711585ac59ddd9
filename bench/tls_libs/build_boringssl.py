"""Build BoringSSL (static ``libboringssl.a``) from the copy in grpcio's source archive.

::

    python bench/tls_libs/build_boringssl.py --out /tmp/boringssl [--jobs 2]

BoringSSL has no release packages; the one copy these package registries carry
is the one vendored in grpcio's source distribution on PyPI
(``third_party/boringssl-with-bazel``, with its generated assembly).  This
script downloads that archive (``pip download grpcio --no-binary :all:``),
compiles the BoringSSL files that grpcio's own build lists
(``grpc_core_dependencies.py``) with ``g++``/``gcc`` at low priority, and
writes ``--out/lib/libboringssl.a`` and ``--out/include``.  Used by ``python
bench/tls_libs.py --boringssl DIR``.  A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys
import tarfile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args(argv)
    work = os.path.join(a.out, "src")
    os.makedirs(work, exist_ok=True)
    if not glob.glob(os.path.join(work, "grpcio-*.tar.gz")):
        subprocess.run([sys.executable, "-m", "pip", "download", "grpcio", "--no-binary", ":all:", "--no-deps",
                        "-d", work], check=True)
    [archive] = glob.glob(os.path.join(work, "grpcio-*.tar.gz"))
    root = archive[:-len(".tar.gz")]
    if not os.path.isdir(root):
        with tarfile.open(archive) as t:
            t.extractall(work, filter="data")
    sys.path.insert(0, os.path.join(root, "src", "python", "grpcio"))
    import grpc_core_dependencies as deps

    sources = [f for f in deps.CORE_SOURCE_FILES if f.startswith("third_party/boringssl-with-bazel/")]
    # the assembly for this system (the others are for Apple and Windows)
    sources += [f for f in deps.ASM_SOURCE_FILES["crypto_asm"] if "-apple." not in f and "-win." not in f]
    include = os.path.join(root, "third_party", "boringssl-with-bazel", "include")
    objdir = os.path.join(a.out, "obj")
    os.makedirs(objdir, exist_ok=True)

    def compile_one(src: str) -> str:
        obj = os.path.join(objdir, src.replace("/", "_") + ".o")
        if not os.path.exists(obj):
            cc = ["g++", "-std=c++17"] if src.endswith(".cc") else ["gcc"]
            subprocess.run(["nice", "-n", "19", *cc, "-O2", "-fPIC", "-I", include, "-c",
                            os.path.join(root, src), "-o", obj], check=True)
        return obj

    with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
        objs = list(pool.map(compile_one, sources))
    libdir = os.path.join(a.out, "lib")
    os.makedirs(libdir, exist_ok=True)
    lib = os.path.join(libdir, "libboringssl.a")
    if os.path.exists(lib):
        os.remove(lib)
    subprocess.run(["ar", "rcs", lib, *objs], check=True)
    shutil.copytree(include, os.path.join(a.out, "include"), dirs_exist_ok=True)
    print(f"{lib}: {len(objs)} objects")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
