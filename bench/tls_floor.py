"""What one server-side TLS session costs in this machine's OpenSSL, before any server code.

::

    python bench/tls_floor.py [--conns 2000] [--out bench/results]

(``pip install pyopenssl`` adds the handshake figure of the OpenSSL bundled
with ``cryptography``.)

A TLS server keeps, per connection, an OpenSSL ``SSL`` object: its own
structure, the session, the record layer's cipher contexts and, unless
``SSL_MODE_RELEASE_BUFFERS`` is set, a read and a write buffer of about 17 KB
each once a record has gone each way.  No server written on this OpenSSL can
hold a TLS connection in less, whatever it does around it.  This script
measures that floor in one process, with no sockets: ``--conns`` server
sessions each complete a TLS 1.3 handshake with a client session through
memory BIOs, then exchange one 512-byte record each way; the client sessions
are freed as soon as they are done.  The server sessions' heap (glibc's
``mallinfo2``: bytes in use, including mmapped blocks) is read before and
after, divided by ``--conns``:

* ``ssl_new``: ``SSL_new`` alone, before any handshake;
* ``openssl``: after the handshake and one record each way, default mode
  (what CPython's ``ssl`` module, and so uvloop's TLS, runs with);
* ``openssl-release``: the same with ``SSL_MODE_RELEASE_BUFFERS`` (buffers
  freed while idle), the two memory BIOs replaced by fresh ones (a layer that
  drops its BIOs' spare capacity);
* ``cpython-ssl``: ``ssl.SSLObject`` over two ``ssl.MemoryBIO``, the objects
  uvloop's TLS layer keeps per connection (heap of the process, so Python's
  own objects count too).

Then what a server-side TLS 1.3 handshake costs in CPU, alone: ``--conns``
handshakes through memory BIOs again, with the server's share timed by the
thread's CPU clock (creating its session, taking the client's bytes,
``do_handshake``, handing its bytes over; the client's share is not
counted), in microseconds per handshake (``server_handshake_us``):

* ``cpython-ssl``: Python's ``ssl`` (this machine's OpenSSL) as a server
  gets it from ``ssl.create_default_context`` (two session tickets sent);
* ``cpython-ssl-no-tickets``: the same with ``num_tickets = 0``;
* ``pyopenssl``: the OpenSSL that the ``cryptography`` wheel bundles
  (usually a newer release), through pyOpenSSL, when it is installed
  (``pyopenssl_version`` says which).

No socket, no event loop and no WebSocket is involved: a server on this
library cannot spend less per handshake than these.

The certificate is a P-256 self-signed one made with ``openssl req`` in a
temporary directory.  Everything runs in memory and stops by itself; it needs
``openssl`` on the PATH and the ``libssl`` that CPython's ``ssl`` uses.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import ssl
import subprocess
import tempfile
import time

SSL_FILETYPE_PEM = 1
SSL_CTRL_MODE = 33
SSL_MODE_RELEASE_BUFFERS = 0x10
RECORD = 512


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL(None)
_libc.mallinfo2.restype = _Mallinfo2


def heap_in_use() -> int:
    """Bytes the C heap has handed out (small blocks plus mmapped ones)."""
    m = _libc.mallinfo2()
    return m.uordblks + m.hblkhd


def _libssl() -> ctypes.CDLL:
    """The libssl CPython's ``ssl`` module is linked with (same version)."""
    import _ssl
    path = None
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "libssl" in line:
                path = line.split()[-1]
                break
    lib = ctypes.CDLL(path or ctypes.util.find_library("ssl"))
    vp, cp, ci, cl = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_long
    for name, res, args in (
            ("TLS_server_method", vp, []), ("TLS_client_method", vp, []),
            ("SSL_CTX_new", vp, [vp]), ("SSL_CTX_ctrl", cl, [vp, ci, cl, vp]),
            ("SSL_CTX_use_certificate_chain_file", ci, [vp, cp]),
            ("SSL_CTX_use_PrivateKey_file", ci, [vp, cp, ci]),
            ("SSL_new", vp, [vp]), ("SSL_free", None, [vp]),
            ("SSL_set_bio", None, [vp, vp, vp]),
            ("SSL_set_accept_state", None, [vp]), ("SSL_set_connect_state", None, [vp]),
            ("SSL_do_handshake", ci, [vp]), ("SSL_is_init_finished", ci, [vp]),
            ("SSL_read", ci, [vp, vp, ci]), ("SSL_write", ci, [vp, vp, ci]),
            ("BIO_new", vp, [vp]), ("BIO_s_mem", vp, []),
            ("BIO_read", ci, [vp, vp, ci]), ("BIO_write", ci, [vp, vp, ci])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    del _ssl
    return lib


def make_cert(directory: str) -> tuple[str, str]:
    key, cert = os.path.join(directory, "key.pem"), os.path.join(directory, "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=127.0.0.1"],
                   check=True, capture_output=True, timeout=30)
    return cert, key


class _OpenSSL:
    """Server and client sessions driven through memory BIOs."""

    def __init__(self, cert: str, key: str, release: bool) -> None:
        lib = self.lib = _libssl()
        self.server = lib.SSL_CTX_new(lib.TLS_server_method())
        if (lib.SSL_CTX_use_certificate_chain_file(self.server, cert.encode()) != 1
                or lib.SSL_CTX_use_PrivateKey_file(self.server, key.encode(), SSL_FILETYPE_PEM) != 1):
            raise RuntimeError("cannot load the certificate")
        if release:
            lib.SSL_CTX_ctrl(self.server, SSL_CTRL_MODE, SSL_MODE_RELEASE_BUFFERS, None)
        self.release = release
        self.client = lib.SSL_CTX_new(lib.TLS_client_method())
        self.buf = ctypes.create_string_buffer(65536)
        self.record = ctypes.create_string_buffer(b"x" * RECORD)

    def session(self, ctx, accept: bool):
        lib = self.lib
        ssl_ = lib.SSL_new(ctx)
        rbio, wbio = lib.BIO_new(lib.BIO_s_mem()), lib.BIO_new(lib.BIO_s_mem())
        lib.SSL_set_bio(ssl_, rbio, wbio)
        (lib.SSL_set_accept_state if accept else lib.SSL_set_connect_state)(ssl_)
        return ssl_, rbio, wbio

    def _pump(self, src, dst) -> None:
        while (n := self.lib.BIO_read(src, self.buf, len(self.buf))) > 0:
            self.lib.BIO_write(dst, self.buf, n)

    def connect_one(self):
        lib = self.lib
        sv, sr, sw = self.session(self.server, True)
        cl, cr, cw = self.session(self.client, False)
        for _ in range(10):
            lib.SSL_do_handshake(cl)
            self._pump(cw, sr)
            lib.SSL_do_handshake(sv)
            self._pump(sw, cr)
            if lib.SSL_is_init_finished(sv) and lib.SSL_is_init_finished(cl):
                break
        else:
            raise RuntimeError("the TLS handshake did not finish")
        lib.SSL_write(cl, self.record, RECORD)
        self._pump(cw, sr)
        if lib.SSL_read(sv, self.buf, len(self.buf)) != RECORD:
            raise RuntimeError("the server did not read the record")
        lib.SSL_write(sv, self.record, RECORD)
        self._pump(sw, cr)
        if lib.SSL_read(cl, self.buf, len(self.buf)) != RECORD:
            raise RuntimeError("the client did not read the record")
        lib.SSL_free(cl)
        if self.release:  # fresh, empty BIOs: what a layer that trims them keeps
            lib.SSL_set_bio(sv, lib.BIO_new(lib.BIO_s_mem()), lib.BIO_new(lib.BIO_s_mem()))
        return sv


def per_conn(build, n: int) -> tuple[float, list]:
    keep = []
    base = heap_in_use()
    for _ in range(n):
        keep.append(build())
    return (heap_in_use() - base) / n, keep


def cpython_ssl(cert: str, key: str, n: int) -> float:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    record = b"x" * RECORD

    def step(obj) -> None:
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass

    def one():
        s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
        sv = server.wrap_bio(s_in, s_out, server_side=True)
        cl = client.wrap_bio(c_in, c_out, server_side=False)
        for _ in range(10):
            step(cl)
            s_in.write(c_out.read())
            step(sv)
            c_in.write(s_out.read())
        cl.write(record)
        s_in.write(c_out.read())
        assert sv.read(65536) == record
        sv.write(record)
        c_in.write(s_out.read())
        assert cl.read(65536) == record
        return sv, s_in, s_out

    return per_conn(one, n)[0]


def handshake_cpu(cert: str, key: str, n: int, tickets: bool = True) -> float:
    """Server CPU (µs) per TLS 1.3 handshake through Python's ``ssl``."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    if not tickets:
        server.num_tickets = 0
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    clock = time.thread_time
    spent = 0.0
    for _ in range(n):
        t0 = clock()
        s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        sv = server.wrap_bio(s_in, s_out, server_side=True)
        spent += clock() - t0
        c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        cl = client.wrap_bio(c_in, c_out, server_side=False)
        for _ in range(10):
            try:
                cl.do_handshake()
            except ssl.SSLWantReadError:
                pass
            data = c_out.read()
            t0 = clock()
            s_in.write(data)
            try:
                sv.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            out = s_out.read()
            spent += clock() - t0
            c_in.write(out)
            if done:
                cl.do_handshake()
                break
        else:
            raise RuntimeError("the TLS handshake did not finish")
        if sv.version() != "TLSv1.3":
            raise RuntimeError(f"negotiated {sv.version()}, not TLSv1.3")
    return spent / n * 1e6


def handshake_cpu_pyopenssl(cert: str, key: str, n: int) -> tuple[float, str]:
    """Server CPU (µs) per TLS 1.3 handshake through pyOpenSSL (the OpenSSL
    the ``cryptography`` wheel bundles), and that OpenSSL's version."""
    from OpenSSL import SSL

    server = SSL.Context(SSL.TLS_SERVER_METHOD)
    server.use_certificate_chain_file(cert)
    server.use_privatekey_file(key)
    client = SSL.Context(SSL.TLS_CLIENT_METHOD)

    def drain(conn) -> bytes:
        try:
            return conn.bio_read(65536)
        except SSL.WantReadError:
            return b""

    clock = time.thread_time
    spent = 0.0
    for _ in range(n):
        t0 = clock()
        sv = SSL.Connection(server, None)
        sv.set_accept_state()
        spent += clock() - t0
        cl = SSL.Connection(client, None)
        cl.set_connect_state()
        for _ in range(10):
            try:
                cl.do_handshake()
            except SSL.WantReadError:
                pass
            data = drain(cl)
            t0 = clock()
            if data:
                sv.bio_write(data)
            try:
                sv.do_handshake()
                done = True
            except SSL.WantReadError:
                done = False
            out = drain(sv)
            spent += clock() - t0
            if out:
                cl.bio_write(out)
            if done:
                cl.do_handshake()
                break
        else:
            raise RuntimeError("the TLS handshake did not finish")
        if sv.get_protocol_version_name() != "TLSv1.3":
            raise RuntimeError(f"negotiated {sv.get_protocol_version_name()}, not TLSv1.3")
    return spent / n * 1e6, SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--out", default=None, help="directory for tls-floor-<stamp>.json")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = make_cert(tmp)
        plain = _OpenSSL(cert, key, release=False)
        res = {"conns": a.conns, "record": RECORD, "openssl": ssl.OPENSSL_VERSION,
               "python": platform.python_version(), "bytes_per_conn": {}}
        figures = res["bytes_per_conn"]
        figures["ssl_new"] = round(per_conn(lambda: plain.lib.SSL_new(plain.server), a.conns)[0])
        figures["openssl"] = round(per_conn(plain.connect_one, a.conns)[0])
        figures["openssl-release"] = round(per_conn(_OpenSSL(cert, key, True).connect_one, a.conns)[0])
        figures["cpython-ssl"] = round(cpython_ssl(cert, key, a.conns))
        cpu = res["server_handshake_us"] = {}
        cpu["cpython-ssl"] = round(handshake_cpu(cert, key, a.conns), 1)
        cpu["cpython-ssl-no-tickets"] = round(handshake_cpu(cert, key, a.conns, tickets=False), 1)
        try:
            cpu["pyopenssl"], res["pyopenssl_version"] = handshake_cpu_pyopenssl(cert, key, a.conns)
            cpu["pyopenssl"] = round(cpu["pyopenssl"], 1)
        except ImportError:
            res["pyopenssl_version"] = None      # not installed: pip install pyopenssl
    line = json.dumps(res)
    print(line)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, time.strftime("tls-floor-%Y%m%d-%H%M%S.json"))
        with open(path, "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
