"""``python bench/tls_libs.py``: one TLS session's heap and handshake CPU in
OpenSSL and in wolfSSL, measured in C, smoke size.

Builds the C measurement against both libraries (Debian's ``libssl-dev`` and
``libwolfssl-dev``, which ``.ci/run`` installs), runs 100 real TLS 1.3
handshakes with each and checks the report: both libraries answered with
their version, every figure is there and positive.  Then BoringSSL, built
from grpcio's source archive (downloaded from PyPI), measured the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_tls_libs_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "bench/tls_libs.py", "--conns", "100", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [written] = list(tmp_path.glob("tls-libs-*.json"))
    res = json.loads(written.read_text())
    assert res == json.loads(proc.stdout)
    assert set(res["libs"]) == {"openssl", "wolfssl"}
    for lib, fig in res["libs"].items():
        assert fig["lib"] == lib and fig["version"] and fig["sessions"] == 101, fig
        assert fig["bytes_per_session"] > 0 and fig["server_handshake_us"] > 0, fig


@pytest.mark.timeout(1500)
def test_boringssl_from_grpcio_source_is_measured_too(tmp_path):
    """``bench/tls_libs/build_boringssl.py`` downloads grpcio's source archive,
    builds the BoringSSL inside it, and ``tls_libs.py --boringssl`` measures
    it through the same OpenSSL code: the report names BoringSSL, and its idle
    session holds less heap than OpenSSL's (the figure bench/README quotes)."""
    out = tmp_path / "boringssl"
    proc = subprocess.run([sys.executable, "bench/tls_libs/build_boringssl.py", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "lib" / "libboringssl.a").is_file() and (out / "include" / "openssl" / "ssl.h").is_file()
    proc = subprocess.run([sys.executable, "bench/tls_libs.py", "--conns", "100", "--boringssl", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    libs = json.loads(proc.stdout)["libs"]
    assert libs["boringssl"]["lib"] == "boringssl" and libs["boringssl"]["version"] == "BoringSSL", libs
    assert 0 < libs["boringssl"]["bytes_per_session"] < libs["openssl"]["bytes_per_session"], libs
