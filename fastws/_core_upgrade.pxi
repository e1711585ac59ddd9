# Part of fastws/_core.pyx (included there, in order): the C opening-handshake parser (the fast upgrade) and SHA-1/base64 for Sec-WebSocket-Accept.

# ---------------------------------------------------------------- handshake C helpers
# SHA-1 (FIPS 180-4) and base64 for Sec-WebSocket-Accept, so the common
# upgrade is answered without a Python call; checked against hashlib in
# tests/unit/test_handshake.py.
cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static inline uint32_t fastws_rol(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }
    static void fastws_sha1_block(uint32_t h[5], const unsigned char *p) {
        uint32_t w[80], a, b, c, d, e, t;
        int i;
        for (i = 0; i < 16; i++)
            w[i] = ((uint32_t)p[4*i] << 24) | ((uint32_t)p[4*i+1] << 16) | ((uint32_t)p[4*i+2] << 8) | p[4*i+3];
        for (i = 16; i < 80; i++)
            w[i] = fastws_rol(w[i-3] ^ w[i-8] ^ w[i-14] ^ w[i-16], 1);
        a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4];
        for (i = 0; i < 80; i++) {
            uint32_t f, k;
            if (i < 20)      { f = (b & c) | (~b & d);          k = 0x5A827999u; }
            else if (i < 40) { f = b ^ c ^ d;                   k = 0x6ED9EBA1u; }
            else if (i < 60) { f = (b & c) | (b & d) | (c & d); k = 0x8F1BBCDCu; }
            else             { f = b ^ c ^ d;                   k = 0xCA62C1D6u; }
            t = fastws_rol(a, 5) + f + e + k + w[i];
            e = d; d = c; c = fastws_rol(b, 30); b = a; a = t;
        }
        h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e;
    }
    /* SHA-1 of msg (len < 2^32 bytes) into out[20] */
    static void fastws_sha1(const unsigned char *msg, size_t len, unsigned char out[20]) {
        uint32_t h[5] = {0x67452301u, 0xEFCDAB89u, 0x98BADCFEu, 0x10325476u, 0xC3D2E1F0u};
        unsigned char block[64];
        size_t i = 0, r;
        uint64_t bits = (uint64_t)len * 8;
        for (; i + 64 <= len; i += 64) fastws_sha1_block(h, msg + i);
        r = len - i;
        memcpy(block, msg + i, r);
        block[r++] = 0x80;
        if (r > 56) { memset(block + r, 0, 64 - r); fastws_sha1_block(h, block); r = 0; }
        memset(block + r, 0, 56 - r);
        for (i = 0; i < 8; i++) block[56 + i] = (unsigned char)(bits >> (56 - 8 * i));
        fastws_sha1_block(h, block);
        for (i = 0; i < 5; i++) {
            out[4*i] = (unsigned char)(h[i] >> 24); out[4*i+1] = (unsigned char)(h[i] >> 16);
            out[4*i+2] = (unsigned char)(h[i] >> 8); out[4*i+3] = (unsigned char)h[i];
        }
    }
    static const char fastws_b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    /* base64 of 20 bytes: 28 characters (one '=' of padding) */
    static void fastws_b64_20(const unsigned char in[20], char out[28]) {
        int i, o = 0;
        for (i = 0; i < 18; i += 3) {
            uint32_t v = ((uint32_t)in[i] << 16) | ((uint32_t)in[i+1] << 8) | in[i+2];
            out[o++] = fastws_b64[v >> 18]; out[o++] = fastws_b64[(v >> 12) & 63];
            out[o++] = fastws_b64[(v >> 6) & 63]; out[o++] = fastws_b64[v & 63];
        }
        {
            uint32_t v = ((uint32_t)in[18] << 16) | ((uint32_t)in[19] << 8);
            out[o++] = fastws_b64[v >> 18]; out[o++] = fastws_b64[(v >> 12) & 63];
            out[o++] = fastws_b64[(v >> 6) & 63]; out[o++] = '=';
        }
    }
    """
    void fastws_sha1(const unsigned char* msg, size_t len, unsigned char* out) nogil
    void fastws_b64_20(const unsigned char* inp, char* out) nogil

# ---------------------------------------------------------------- fast upgrade
# The common opening handshake, decided without Python: a plain request
# (exactly what fastws.handshake.parse_fast accepts, and a subset of it) to a
# route without on_connect.  Anything else -- or any doubt -- goes to the
# Python handshake (wsproto semantics), so both answer alike; the unit tests
# check that every head this parser accepts gets the same answer from
# fastws.handshake.

cdef struct _Plain:
    Py_ssize_t path_end      # the target is p[4:target_end]; the path p[4:path_end]
    Py_ssize_t target_end
    Py_ssize_t key_start     # the 24 key characters
    bint has_ext             # Sec-WebSocket-Extensions offered
    Py_ssize_t host_start    # the Host value is p[host_start:host_end] (SP/HT trimmed)
    Py_ssize_t host_end
    Py_ssize_t origin_start  # the Origin value p[origin_start:origin_end]; -1: no Origin
    Py_ssize_t origin_end

# What the fast path decides alone about the Origin header (Hub.set_fast_upgrade
# origins=...); whatever it does not take goes to fastws.handshake.OriginPolicy.
cdef enum OriginMode:
    ORIGIN_ANY = 0         # "*": the Origin header is not looked at
    ORIGIN_SAME_HOST = 1   # no Origin, or http(s)://<the Host value> (any case)
    ORIGIN_ABSENT = 2      # no Origin only (an allow-list of origins)

cdef bytes _ACCEPT_HEAD = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                           b"Connection: Upgrade\r\nSec-WebSocket-Accept: ")
cdef bytes _WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

cdef uint8_t _TOKEN_CHARS[256]
cdef uint8_t _B64_CHARS[256]

cdef void _init_token_tables():
    cdef int i
    for i in range(256):
        _TOKEN_CHARS[i] = 0
        _B64_CHARS[i] = 0
    for c in b"!#$%&'*+.^_`|~-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        _TOKEN_CHARS[c] = 1
    for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/":
        _B64_CHARS[c] = 1

_init_token_tables()

cdef inline bint _ieq(const uint8_t* p, Py_ssize_t n, const char* lower) noexcept nogil:
    """p[:n] equals the lower-case ASCII string ``lower`` (of length n), ignoring case."""
    cdef Py_ssize_t i
    cdef uint8_t c
    for i in range(n):
        c = p[i]
        if 0x41 <= c <= 0x5A:
            c += 0x20
        if c != <uint8_t>lower[i]:
            return False
    return True

cdef bint _has_upgrade_token(const uint8_t* v, Py_ssize_t n) noexcept nogil:
    """Some comma-separated token of v[:n] is "upgrade" (any case, SP/HT trimmed)."""
    cdef Py_ssize_t i = 0, a, b
    while i <= n:
        a = i
        while i < n and v[i] != 0x2C:
            i += 1
        b = i
        while a < b and (v[a] == 0x20 or v[a] == 0x09):
            a += 1
        while b > a and (v[b - 1] == 0x20 or v[b - 1] == 0x09):
            b -= 1
        if b - a == 7 and _ieq(v + a, 7, "upgrade"):
            return True
        i += 1
    return False

cdef bint _parse_plain(const uint8_t* p, Py_ssize_t n, _Plain* out) noexcept nogil:
    """Parse the head p[:n] (ending with the first CRLFCRLF).  True only for a
    plain, valid upgrade request; False means "ask the Python handshake"."""
    cdef Py_ssize_t i, name_start, name_len, v0, v1, line_end
    cdef uint8_t c
    cdef int seen = 0, bit, k
    if n < 20 or p[0] != 0x47 or p[1] != 0x45 or p[2] != 0x54 or p[3] != 0x20 or p[4] != 0x2F:
        return False                                          # "GET /"
    i = 4
    out.path_end = -1
    while i < n:
        c = p[i]
        if c == 0x20:
            break
        if c < 0x21 or c > 0x7E:
            return False
        if c == 0x3F and out.path_end < 0:                    # '?'
            out.path_end = i
        i += 1
    out.target_end = i
    if out.path_end < 0:
        out.path_end = i
    if i + 11 > n or memcmp(p + i, b" HTTP/1.1\r\n", 11) != 0:
        return False
    i += 11
    out.key_start = -1
    out.has_ext = False
    out.host_start = out.host_end = 0
    out.origin_start = out.origin_end = -1
    while True:
        if i + 2 > n:
            return False
        if p[i] == 0x0D and p[i + 1] == 0x0A:                 # the empty line
            if i + 2 != n:
                return False
            break
        name_start = i
        while i < n and _TOKEN_CHARS[p[i]]:
            i += 1
        name_len = i - name_start
        if name_len == 0 or i >= n or p[i] != 0x3A:           # token then ':'
            return False
        i += 1
        v0 = i
        while i < n:
            c = p[i]
            if (c < 0x20 and c != 0x09) or c == 0x7F or c > 0x7E:
                break
            i += 1
        if i + 1 >= n or p[i] != 0x0D or p[i + 1] != 0x0A:
            return False
        line_end = i
        i += 2
        v1 = line_end
        while v0 < v1 and (p[v0] == 0x20 or p[v0] == 0x09):
            v0 += 1
        while v1 > v0 and (p[v1 - 1] == 0x20 or p[v1 - 1] == 0x09):
            v1 -= 1
        bit = 0
        if name_len == 4 and _ieq(p + name_start, 4, "host"):
            bit = 1
            out.host_start = v0
            out.host_end = v1
        elif name_len == 6 and _ieq(p + name_start, 6, "origin"):
            bit = 128
            out.origin_start = v0
            out.origin_end = v1
        elif name_len == 7 and _ieq(p + name_start, 7, "upgrade"):
            bit = 2
            if not (v1 - v0 == 9 and _ieq(p + v0, 9, "websocket")):
                return False
        elif name_len == 10 and _ieq(p + name_start, 10, "connection"):
            bit = 4
            if not _has_upgrade_token(p + v0, v1 - v0):
                return False
        elif name_len == 17 and _ieq(p + name_start, 17, "sec-websocket-key"):
            bit = 8
            if v1 - v0 != 24 or p[v0 + 22] != 0x3D or p[v0 + 23] != 0x3D:
                return False
            for k in range(22):
                if not _B64_CHARS[p[v0 + k]]:
                    return False
            out.key_start = v0
        elif name_len == 21 and _ieq(p + name_start, 21, "sec-websocket-version"):
            bit = 16
            if not (v1 - v0 == 2 and p[v0] == 0x31 and p[v0 + 1] == 0x33):
                return False
        elif name_len == 22 and _ieq(p + name_start, 22, "sec-websocket-protocol"):
            bit = 32
        elif name_len == 24 and _ieq(p + name_start, 24, "sec-websocket-extensions"):
            bit = 64
            out.has_ext = True
        elif ((name_len == 14 and _ieq(p + name_start, 14, "content-length"))
              or (name_len == 17 and _ieq(p + name_start, 17, "transfer-encoding"))):
            return False                                      # a body framing header: wsproto decides
        if bit:
            if seen & bit:
                return False                                  # duplicated: wsproto decides
            seen |= bit
    return (seen & 31) == 31


cdef bint _origin_ok(const uint8_t* p, const _Plain* r, int mode) noexcept nogil:
    """The parsed request r may be upgraded without asking Python about its
    Origin (OriginMode ``mode``).  For ORIGIN_SAME_HOST: no Origin, or an
    Origin that is "http://" or "https://" (any case) followed by exactly
    the Host value (any case) -- the first test of
    fastws.handshake._same_host.  False: Python decides (403 or allow)."""
    cdef Py_ssize_t on, hn, skip, i
    cdef const uint8_t* o
    cdef uint8_t a, b
    if mode == ORIGIN_ANY or r.origin_start < 0:
        return True
    if mode != ORIGIN_SAME_HOST:
        return False
    o = p + r.origin_start
    on = r.origin_end - r.origin_start
    if on >= 7 and _ieq(o, 7, "http://"):
        skip = 7
    elif on >= 8 and _ieq(o, 8, "https://"):
        skip = 8
    else:
        return False
    hn = r.host_end - r.host_start
    if hn == 0 or on - skip != hn:
        return False
    for i in range(hn):
        a = o[skip + i]
        b = p[r.host_start + i]
        if 0x41 <= a <= 0x5A:
            a += 0x20
        if 0x41 <= b <= 0x5A:
            b += 0x20
        if a != b:
            return False
    return True


cdef int _origin_mode(origins) except -1:
    """The OriginMode of set_fast_upgrade's ``origins`` argument."""
    if origins == "*":
        return ORIGIN_ANY
    if origins == "same-host":
        return ORIGIN_SAME_HOST
    if origins == "none":
        return ORIGIN_ABSENT
    raise ValueError(f"origins must be '*', 'same-host' or 'none', not {origins!r}")


def _fast_accept_for_test(head, origins="*"):
    """(path, query_string, response, has_ext) if the fast path would accept
    ``head`` (bytes ending with the first CRLFCRLF) with the Origin mode
    ``origins`` (see Hub.set_fast_upgrade), else None.  For tests."""
    cdef bytes b = bytes(head)
    cdef _Plain r
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(b)
    cdef int mode = _origin_mode(origins)
    if not _parse_plain(p, len(b), &r) or not _origin_ok(p, &r, mode):
        return None
    path = b[4:r.path_end].decode("ascii")
    query = b[r.path_end + 1:r.target_end].decode("ascii") if r.path_end < r.target_end else ""
    return path, query, _accept_response(p + r.key_start), bool(r.has_ext)


cdef bytes _accept_response(const uint8_t* key):
    """The 101 response for the 24-character key at ``key``."""
    cdef unsigned char buf[60]
    cdef unsigned char digest[20]
    cdef Py_ssize_t hl = len(_ACCEPT_HEAD)
    memcpy(buf, key, 24)
    memcpy(buf + 24, PyBytes_AS_STRING(_WS_GUID), 36)
    fastws_sha1(buf, 60, digest)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, hl + 32)
    cdef char* o = PyBytes_AS_STRING(out)
    memcpy(o, PyBytes_AS_STRING(_ACCEPT_HEAD), hl)
    fastws_b64_20(digest, o + hl)
    memcpy(o + hl + 28, b"\r\n\r\n", 4)
    return out


def _sha1_for_test(data):
    """SHA-1 digest of ``data`` by the C helper (tests compare with hashlib)."""
    cdef bytes b = bytes(data)
    cdef unsigned char digest[20]
    fastws_sha1(<const unsigned char*>PyBytes_AS_STRING(b), len(b), digest)
    return PyBytes_FromStringAndSize(<char*>digest, 20)
