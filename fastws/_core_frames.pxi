# Part of fastws/_core.pyx (included there, in order): masking, frame encoding, frame-header helpers.

# ---------------------------------------------------------------- masking

cdef inline void _unmask(uint8_t* p, Py_ssize_t n, const uint8_t* key, uint32_t offset) noexcept nogil:
    """XOR ``n`` bytes at ``p`` in place with the 4-byte ``key`` rotated by
    ``offset`` (the position of ``p`` in the frame payload, mod 4): eight
    bytes per step, then the tail byte by byte."""
    cdef uint8_t k[8]
    cdef Py_ssize_t i
    cdef uint64_t w, kw
    for i in range(8):
        k[i] = key[(offset + i) & 3]
    memcpy(&kw, k, 8)
    i = 0
    while i + 32 <= n:
        memcpy(&w, p + i, 8); w ^= kw; memcpy(p + i, &w, 8)
        memcpy(&w, p + i + 8, 8); w ^= kw; memcpy(p + i + 8, &w, 8)
        memcpy(&w, p + i + 16, 8); w ^= kw; memcpy(p + i + 16, &w, 8)
        memcpy(&w, p + i + 24, 8); w ^= kw; memcpy(p + i + 24, &w, 8)
        i += 32
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        w ^= kw
        memcpy(p + i, &w, 8)
        i += 8
    while i < n:
        p[i] ^= k[i & 7]
        i += 1

# ---------------------------------------------------------------- client masking keys
# A client masks every frame with a fresh key (RFC 6455 5.3).  The RFC asks
# for keys an application cannot predict, so that a script cannot choose the
# bytes that appear on the wire (cache poisoning of intermediaries, 10.3); it
# does not ask for secrecy (the key travels in clear in the frame).  The keys
# come from the OS CSPRNG (os.urandom), read in batches of MASK_POOL bytes
# instead of one getrandom(2) call per frame: the same unpredictability, one
# syscall per 1,024 frames.  One pool per process; a forked child starts with
# an empty pool, so parent and child never share keys.

DEF MASK_POOL = 4096

cdef bytes _mask_pool = _EMPTY
cdef Py_ssize_t _mask_pos = 0


cdef const uint8_t* _next_mask() except NULL:
    """A fresh 4-byte masking key (valid until the next call)."""
    global _mask_pool, _mask_pos
    if _mask_pos + 4 > PyBytes_GET_SIZE(_mask_pool):
        _mask_pool = _os.urandom(MASK_POOL)
        _mask_pos = 0
    cdef const uint8_t* key = <const uint8_t*>PyBytes_AS_STRING(_mask_pool) + _mask_pos
    _mask_pos += 4
    return key


def _drop_mask_pool():
    """After fork: the child draws its own keys."""
    global _mask_pool, _mask_pos
    _mask_pool = _EMPTY
    _mask_pos = 0


_os.register_at_fork(after_in_child=_drop_mask_pool)

# ---------------------------------------------------------------- encoding

cdef bytes _encode(int opcode, const uint8_t* payload, Py_ssize_t n, bint fin,
                   const uint8_t* mask, bint rsv1):
    """One frame, header + payload, in a single new bytes object."""
    cdef Py_ssize_t hlen = 2
    if n > 65535:
        hlen = 10
    elif n > 125:
        hlen = 4
    if mask != NULL:
        hlen += 4
    cdef bytes out = PyBytes_FromStringAndSize(NULL, hlen + n)
    cdef uint8_t* o = <uint8_t*>PyBytes_AS_STRING(out)
    o[0] = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | (opcode & 0x0F)
    cdef uint8_t mbit = 0x80 if mask != NULL else 0
    cdef Py_ssize_t pos
    cdef uint64_t ln = <uint64_t>n
    if n > 65535:
        o[1] = mbit | 127
        for pos in range(8):
            o[2 + pos] = (ln >> (56 - 8 * pos)) & 0xFF
        pos = 10
    elif n > 125:
        o[1] = mbit | 126
        o[2] = (n >> 8) & 0xFF
        o[3] = n & 0xFF
        pos = 4
    else:
        o[1] = mbit | <uint8_t>n
        pos = 2
    if mask != NULL:
        memcpy(o + pos, mask, 4)
        pos += 4
    if n:
        memcpy(o + pos, payload, n)
        if mask != NULL:
            _unmask(o + pos, n, mask, 0)
    return out


def encode_frame(int opcode, payload, bint fin=True, mask=None, bint rsv1=False):
    """Encode one frame.  ``mask`` (4 bytes) makes a masked client frame;
    ``None`` an unmasked server frame.  ``payload`` is bytes-like or str."""
    if isinstance(payload, str):
        payload = (<str>payload).encode("utf-8")
    cdef const uint8_t[:] pv = payload
    cdef const uint8_t[:] mv
    cdef const uint8_t* mp = NULL
    cdef const uint8_t* pp = NULL
    if pv.shape[0]:
        pp = &pv[0]
    if mask is not None:
        mv = mask
        if mv.shape[0] != 4:
            raise ValueError("mask must be 4 bytes")
        mp = &mv[0]
    return _encode(opcode, pp, pv.shape[0], fin, mp, rsv1)


cdef bytes _encode_header(int opcode, Py_ssize_t n):
    """Only the (unmasked, FIN) header of a frame of ``n`` payload bytes."""
    cdef bytes out
    cdef uint8_t* o
    cdef int i
    cdef uint64_t ln = <uint64_t>n
    if n > 65535:
        out = PyBytes_FromStringAndSize(NULL, 10)
        o = <uint8_t*>PyBytes_AS_STRING(out)
        o[1] = 127
        for i in range(8):
            o[2 + i] = (ln >> (56 - 8 * i)) & 0xFF
    elif n > 125:
        out = PyBytes_FromStringAndSize(NULL, 4)
        o = <uint8_t*>PyBytes_AS_STRING(out)
        o[1] = 126
        o[2] = (n >> 8) & 0xFF
        o[3] = n & 0xFF
    else:
        out = PyBytes_FromStringAndSize(NULL, 2)
        o = <uint8_t*>PyBytes_AS_STRING(out)
        o[1] = <uint8_t>n
    o[0] = 0x80 | (opcode & 0x0F)
    return out


cdef class _RawBuffer:
    """A writable buffer over memory owned by ``owner`` (a bytes object the
    engine is still filling and nobody else has seen): lets the transport read
    a large frame's payload straight into the message's final bytes."""
    cdef char* ptr
    cdef Py_ssize_t size
    cdef object owner

    def __getbuffer__(self, Py_buffer* buf, int flags):
        PyBuffer_FillInfo(buf, self, self.ptr, self.size, 0, flags)

    def __releasebuffer__(self, Py_buffer* buf):
        pass

    def __len__(self):          # uvloop's TLS layer asks
        return self.size


cdef inline bytes _encode_bytes(int opcode, bytes payload):
    return _encode(opcode, <const uint8_t*>PyBytes_AS_STRING(payload),
                   PyBytes_GET_SIZE(payload), True, NULL, False)


cdef bytes _close_payload(int code, str reason):
    if code == 1005:
        return _EMPTY
    cdef bytes r = reason.encode("utf-8") if reason else _EMPTY
    return bytes(((code >> 8) & 0xFF, code & 0xFF)) + r


cdef inline bint _valid_close_code(int code) noexcept:
    return (1000 <= code <= 1003) or (1007 <= code <= 1014) or (3000 <= code <= 4999)

# ---------------------------------------------------------------- frame headers

cdef inline Py_ssize_t _length_size(const uint8_t* h) noexcept:
    """Header bytes up to the end of the (extended) length."""
    cdef uint8_t l7 = h[1] & 0x7F
    return 4 if l7 == 126 else (10 if l7 == 127 else 2)


cdef inline Py_ssize_t _header_size(const uint8_t* h) noexcept:
    """Whole header size, masking key included, from its first two bytes."""
    return _length_size(h) + (4 if h[1] & 0x80 else 0)


cdef inline uint64_t _deflate_bound(uint64_t n) noexcept:
    """The most bytes deflate can turn ``n`` bytes into (zlib's compressBound:
    incompressible input goes out in stored blocks, a few bytes each).  The
    compressed size of a message or frame may pass a size limit by this
    much, no more."""
    return n + (n >> 12) + (n >> 14) + (n >> 25) + 13
