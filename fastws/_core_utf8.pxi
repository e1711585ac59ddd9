# Part of fastws/_core.pyx (included there, in order): the incremental UTF-8 validator.

# ---------------------------------------------------------------- UTF-8
# Incremental validator: the DFA of Bjoern Hoehrmann ("Flexible and
# Economical UTF-8 Decoder"), byte classes then transitions; state 0 accepts,
# state 1 rejects.  ASCII runs are skipped eight bytes at a time.

cdef uint8_t _UTF8_CLASS[256]
cdef uint8_t _UTF8_TRANS[108]

cdef void _init_utf8_tables():
    cdef int i
    for i in range(256):
        if i < 0x80:
            _UTF8_CLASS[i] = 0
        elif i < 0x90:
            _UTF8_CLASS[i] = 1
        elif i < 0xA0:
            _UTF8_CLASS[i] = 9
        elif i < 0xC0:
            _UTF8_CLASS[i] = 7
        elif i < 0xC2:
            _UTF8_CLASS[i] = 8
        elif i < 0xE0:
            _UTF8_CLASS[i] = 2
        elif i == 0xE0:
            _UTF8_CLASS[i] = 10
        elif i < 0xED:
            _UTF8_CLASS[i] = 3
        elif i == 0xED:
            _UTF8_CLASS[i] = 4
        elif i < 0xF0:
            _UTF8_CLASS[i] = 3
        elif i == 0xF0:
            _UTF8_CLASS[i] = 11
        elif i < 0xF4:
            _UTF8_CLASS[i] = 6
        elif i == 0xF4:
            _UTF8_CLASS[i] = 5
        else:
            _UTF8_CLASS[i] = 8
    # states are multiples of 12: 0 accept, 12 reject, 24.. intermediate
    cdef uint8_t trans[108]
    trans[:] = [
        0, 12, 24, 36, 60, 96, 84, 12, 12, 12, 48, 72,
        12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12,
        12, 0, 12, 12, 12, 12, 12, 0, 12, 0, 12, 12,
        12, 24, 12, 12, 12, 12, 12, 24, 12, 24, 12, 12,
        12, 12, 12, 12, 12, 12, 12, 24, 12, 12, 12, 12,
        12, 24, 12, 12, 12, 12, 12, 12, 12, 24, 12, 12,
        12, 12, 12, 12, 12, 12, 12, 36, 12, 36, 12, 12,
        12, 36, 12, 12, 12, 12, 12, 36, 12, 36, 12, 12,
        12, 36, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12,
    ]
    for i in range(108):
        _UTF8_TRANS[i] = trans[i]

_init_utf8_tables()

DEF UTF8_ACCEPT = 0
DEF UTF8_REJECT = 12


cdef inline uint32_t _utf8_run(uint32_t state, const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """Advance the DFA over ``n`` bytes; returns the new state (12 = invalid)."""
    cdef Py_ssize_t i = 0
    cdef uint64_t w
    while i < n:
        if state == UTF8_ACCEPT:
            # skip ASCII eight bytes at a time
            while i + 8 <= n:
                memcpy(&w, p + i, 8)
                if w & 0x8080808080808080ULL:
                    break
                i += 8
            if i >= n:
                break
        state = _UTF8_TRANS[state + _UTF8_CLASS[p[i]]]
        if state == UTF8_REJECT:
            return state
        i += 1
    return state


def utf8_valid(data):
    """True if ``data`` (bytes-like) is complete, valid UTF-8 (test helper)."""
    cdef const uint8_t[:] v = data
    if v.shape[0] == 0:
        return True
    return _utf8_run(0, &v[0], v.shape[0]) == UTF8_ACCEPT
