"""What one server-side TLS 1.3 session costs in each TLS library this machine can build against.

::

    python bench/tls_libs.py [--conns 3000] [--out bench/results] [--boringssl DIR]

Compiles ``bench/tls_libs/tls_session.c`` (C, no Python in the measured path)
with ``gcc`` against OpenSSL (``libssl-dev``) and wolfSSL
(``libwolfssl-dev``), both from Debian, and runs each with ``--conns``
handshakes over in-memory pipes: per kept server session, the heap it holds
after the handshake and one 512-byte record each way (OpenSSL with
``SSL_MODE_RELEASE_BUFFERS`` and fresh memory BIOs: what a lean layer of its
own would keep), and the server's CPU per handshake.  One self-signed P-256
certificate (``openssl req``) for both; everything in a temporary directory;
stops by itself.  Prints one JSON object, and writes it to
``--out/tls-libs-<stamp>.json``.  With ``--boringssl DIR`` (a BoringSSL that
``bench/tls_libs/build_boringssl.py --out DIR`` built from grpcio's source
archive), BoringSSL is measured as well, through the same OpenSSL code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time

from tls_floor import make_cert

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "tls_libs", "tls_session.c")
LIBS = {"openssl": ([], ["-lssl", "-lcrypto"]), "wolfssl": (["-DUSE_WOLFSSL"], ["-lwolfssl"])}


def build(lib: str, directory: str, boringssl: str | None = None) -> str:
    exe = os.path.join(directory, f"tls_session_{lib}")
    if lib == "boringssl":       # C++ inside: compiled as C, linked by g++
        obj = exe + ".o"
        subprocess.run(["gcc", "-O2", "-I", os.path.join(boringssl or "", "include"), "-c", SOURCE, "-o", obj],
                       check=True, capture_output=True, timeout=120)
        subprocess.run(["g++", "-o", exe, obj, os.path.join(boringssl or "", "lib", "libboringssl.a"), "-lpthread"],
                       check=True, capture_output=True, timeout=120)
        return exe
    flags, links = LIBS[lib]
    subprocess.run(["gcc", "-O2", *flags, "-o", exe, SOURCE, *links], check=True, capture_output=True,
                   timeout=120)
    return exe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conns", type=int, default=3000)
    ap.add_argument("--out", default=None, help="directory for tls-libs-<stamp>.json")
    ap.add_argument("--boringssl", default=None, help="a BoringSSL built by bench/tls_libs/build_boringssl.py "
                    "(its --out): measured too")
    a = ap.parse_args(argv)
    res = {"conns": a.conns, "machine": platform.processor() or platform.machine(), "libs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = make_cert(tmp)
        for lib in [*LIBS, *(["boringssl"] if a.boringssl else [])]:
            out = subprocess.run([build(lib, tmp, a.boringssl), str(a.conns), cert, key], check=True,
                                 capture_output=True, text=True, timeout=600)
            res["libs"][lib] = json.loads(out.stdout)
    line = json.dumps(res)
    print(line)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, time.strftime("tls-libs-%Y%m%d-%H%M%S.json")), "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
