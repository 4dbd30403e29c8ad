"""Envelope codec: what a message looks like on the wire.

Every message is two ZeroMQ frames after the routing frame that ROUTER
sockets add or consume (see docs/envelope.md for the full picture):

  header  13 fixed bytes, then the topic:
            0   version   u8     always 1 for this format
            1   kind      u8     CAST, CALL, FANOUT, NOTIFY, PING / RESULT, CHUNK, END,
                                 FAILURE, HEARTBEAT, REFUSED, ACK
            2   flags     u16le  FLAG_MULTI on a CALL asks for a stream, FLAG_ACK
                                 on a CAST for an ACK once it was handled
            4   msg_id    u64le  correlates replies with calls; 0 on casts
            12  topic_len u8     1..255 on requests, 0 on replies
            13  topic     UTF-8
  body    msgpack: [context, message] on requests, the value on RESULT and
          CHUNK, the failure on FAILURE, empty on END and HEARTBEAT.

The header is parsed in C straight from the frame's bytes (no Python object
for it), so the receive loop can drop bad or unknown-topic messages before
any msgpack work.  The body is msgpack because it is what the payloads are;
pickle is never used.  Before msgpack builds anything, `scan_body` walks
the body in C and refuses one that nests too deep or would decode to far
more memory than its size (docs/envelope.md, "Limits on a body").
`_envelope_py.py` is a pure-Python twin used by the property and fuzz
tests.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_Check
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

import msgpack

from nova_zmq_fast._envelope_py import to_primitive
from nova_zmq_fast.exceptions import MalformedEnvelope


cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL


cdef object _unpackb = msgpack.unpackb
cdef object _Packer = msgpack.Packer
cdef object _UnpackException = (ValueError, msgpack.UnpackException, TypeError)

_HEADER_ERRORS = {
    HDR_SHORT: "truncated header",
    HDR_VERSION: "unsupported envelope version",
    HDR_KIND: "unknown message kind",
    HDR_TOPIC: "bad topic field",
}


cdef inline bint is_request(int kind) noexcept nogil:
    return KIND_CAST <= kind <= LAST_REQUEST


cdef inline bint is_reply(int kind) noexcept nogil:
    return KIND_RESULT <= kind <= LAST_REPLY


cdef int parse_header(const char *buf, size_t n, Header *h) noexcept nogil:
    cdef const unsigned char *p = <const unsigned char *>buf
    cdef size_t tlen
    if n < 1:
        return HDR_SHORT
    h.version = p[0]
    if h.version != VERSION:
        return HDR_VERSION
    if n < HEADER_FIXED:
        return HDR_SHORT
    h.kind = p[1]
    if not (is_request(h.kind) or is_reply(h.kind)):
        return HDR_KIND
    h.flags = p[2] | (p[3] << 8)
    h.msg_id = (<uint64_t>p[4] | <uint64_t>p[5] << 8 | <uint64_t>p[6] << 16 |
                <uint64_t>p[7] << 24 | <uint64_t>p[8] << 32 | <uint64_t>p[9] << 40 |
                <uint64_t>p[10] << 48 | <uint64_t>p[11] << 56)
    tlen = p[12]
    if n < HEADER_FIXED + tlen:
        return HDR_SHORT
    if n != HEADER_FIXED + tlen or (is_request(h.kind) and tlen == 0):
        return HDR_TOPIC
    h.topic = buf + HEADER_FIXED
    h.topic_len = tlen
    return HDR_OK


cdef size_t write_header(char *buf, int kind, int flags, uint64_t msg_id,
                         const char *topic, size_t topic_len) noexcept nogil:
    """Write a header into `buf` (at least MAX_HEADER bytes); returns its
    length.  The caller has validated topic_len <= MAX_TOPIC."""
    cdef unsigned char *p = <unsigned char *>buf
    cdef int i
    p[0] = VERSION
    p[1] = <unsigned char>kind
    p[2] = flags & 0xff
    p[3] = (flags >> 8) & 0xff
    for i in range(8):
        p[4 + i] = (msg_id >> (8 * i)) & 0xff
    p[12] = <unsigned char>topic_len
    if topic_len:
        memcpy(buf + HEADER_FIXED, topic, topic_len)
    return HEADER_FIXED + topic_len


cdef int topic_utf8(object topic, const char **data, Py_ssize_t *size) except -1:
    """Validate a topic name and give its UTF-8 bytes without a copy.

    A topic is a non-empty str of at most 255 UTF-8 bytes without '/', '\\\\',
    NUL or whitespace: it names a queue, and for the embedded registry a
    directory too."""
    if not PyUnicode_Check(topic):
        raise TypeError(f"topic must be a str, not {type(topic).__name__}")
    data[0] = PyUnicode_AsUTF8AndSize(topic, size)
    if size[0] == 0:
        raise ValueError("topic must not be empty")
    if size[0] > MAX_TOPIC:
        raise ValueError(f"topic is {size[0]} bytes long; the limit is {MAX_TOPIC}")
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(size[0]):
        c = <unsigned char>data[0][i]
        if c == b'/' or c == b'\\' or c <= 32 or c == 127:
            raise ValueError(f"topic {topic!r} contains a path separator, "
                             f"whitespace or a control character")
    if topic in (".", ".."):
        raise ValueError(f"topic {topic!r} is not a valid name")
    return 0


cdef object new_packer():
    """A msgpack packer for one thread (packers are not thread-safe)."""
    return _Packer(use_bin_type=True, autoreset=True, default=to_primitive)


# What decoding costs in CPython (64-bit), in bytes, per msgpack item.  Each
# is at or above what CPython 3.11 measures, so the estimate is an upper
# bound; tests/fuzz/amplification.py checks it against peak RSS.
cdef enum Cost:
    COST_SLOT = 8           # every item: the pointer its container holds
    COST_NUMBER = 32        # an int outside the cached 0..127, or a float
    COST_STRING = 64        # str or bytes object, plus its length (str: 4 bytes
                            # a byte: one wide character widens the whole str)
    COST_LIST = 72          # list object; the items pay for their slots
    COST_DICT = 72          # empty dict
    COST_DICT_TABLE = 160   # a non-empty dict's smallest table, for up to
    DICT_TABLE_ENTRIES = 5  # ... this many entries
    COST_DICT_ENTRY = 72    # each further entry: its share of the table,
                            # and of the old one while the table grows

_BODY_COSTS = {
    "slot": COST_SLOT, "number": COST_NUMBER, "string": COST_STRING,
    "list": COST_LIST, "dict": COST_DICT, "dict_table": COST_DICT_TABLE,
    "dict_table_entries": DICT_TABLE_ENTRIES, "dict_entry": COST_DICT_ENTRY,
}
BODY_LIMITS = {
    "max_message_default": MAX_MESSAGE_DEFAULT, "max_depth": MAX_DEPTH,
    "decoded_per_byte": DECODED_PER_BYTE, "budget_floor": BUDGET_FLOOR,
    "costs": _BODY_COSTS,
}


cdef enum Container:
    NOT_A_CONTAINER = 0
    LIST = 1
    DICT = 2


cdef inline bint read_length(const unsigned char *p, size_t n, size_t *pos, size_t width,
                             size_t *out) noexcept nogil:
    """Read a big-endian length of `width` bytes at *pos; False if cut short."""
    cdef size_t i, v = 0
    if width > n - pos[0]:
        return False
    for i in range(width):
        v = (v << 8) | p[pos[0] + i]
    pos[0] += width
    out[0] = v
    return True


cdef int scan_body(const char *buf, size_t n, size_t budget) noexcept nogil:
    """Walk a msgpack body without building it.  Refuse it when it is cut
    short, uses the reserved byte or an extension type (our packer writes
    none), nests more than MAX_DEPTH containers, or would cost more than
    `budget` bytes of Python objects.  A container
    must find its declared items in the bytes that follow (each takes one
    byte at least), so no count makes msgpack preallocate for data that is
    not there.  Bytes after the first object are left to msgpack."""
    cdef const unsigned char *p = <const unsigned char *>buf
    cdef size_t left[MAX_DEPTH + 1]     # items still to read, per open container
    cdef int depth = 0
    cdef int container
    cdef size_t pos = 0, cost = 0, count, size
    cdef unsigned char b
    left[0] = 1
    while True:
        while left[depth] == 0:
            if depth == 0:
                return BODY_OK
            depth -= 1
        left[depth] -= 1
        if pos >= n:
            return BODY_SHORT
        b = p[pos]
        pos += 1
        cost += COST_SLOT
        container = NOT_A_CONTAINER
        count = size = 0
        if b <= 0x7f or b == 0xc0 or b == 0xc2 or b == 0xc3:
            pass                                        # cached: 0..127, nil, bools
        elif b >= 0xe0:                                 # negative fixint
            cost += COST_NUMBER
        elif b <= 0x8f:
            container = DICT
            count = b & 0x0f
        elif b <= 0x9f:
            container = LIST
            count = b & 0x0f
        elif b <= 0xbf:                                 # fixstr
            size = b & 0x1f
            cost += COST_STRING + 4 * size
        elif b == 0xc1:
            return BODY_FORMAT
        elif b <= 0xc6:                                 # bin 8/16/32
            if not read_length(p, n, &pos, 1 << (b - 0xc4), &size):
                return BODY_SHORT
            cost += COST_STRING + size
        elif b <= 0xc9:                                 # ext 8/16/32
            return BODY_FORMAT
        elif b <= 0xcb:                                 # float 32/64
            size = 4 << (b - 0xca)
            cost += COST_NUMBER
        elif b <= 0xd3:                                 # uint, int 8/16/32/64
            size = 1 << ((b - 0xcc) & 3)
            cost += COST_NUMBER
        elif b <= 0xd8:                                 # fixext 1..16
            return BODY_FORMAT
        elif b <= 0xdb:                                 # str 8/16/32
            if not read_length(p, n, &pos, 1 << (b - 0xd9), &size):
                return BODY_SHORT
            cost += COST_STRING + 4 * size
        elif b <= 0xdd:                                 # array 16/32
            container = LIST
            if not read_length(p, n, &pos, 2 << (b - 0xdc), &count):
                return BODY_SHORT
        else:                                           # map 16/32
            container = DICT
            if not read_length(p, n, &pos, 2 << (b - 0xde), &count):
                return BODY_SHORT
        if size > n - pos:
            return BODY_SHORT
        pos += size
        if container != NOT_A_CONTAINER:
            if depth == MAX_DEPTH:
                return BODY_DEPTH
            if container == DICT:
                cost += COST_DICT
                if count:
                    cost += COST_DICT_TABLE
                if count > DICT_TABLE_ENTRIES:
                    cost += COST_DICT_ENTRY * (count - DICT_TABLE_ENTRIES)
                count *= 2                              # a key and a value each
            else:
                cost += COST_LIST
            if count > n - pos:
                return BODY_SHORT
            if count:
                depth += 1
                left[depth] = count
        if cost > budget:
            return BODY_COST


cdef size_t check_body(const char *buf, size_t n, Py_ssize_t limit) except 0:
    """Raise MalformedEnvelope unless a body may be decoded under `limit`
    (the node's rpc_zmq_max_message_size; 0 or less means the default)."""
    if limit <= 0:
        limit = MAX_MESSAGE_DEFAULT
    if n > <size_t>limit:
        raise MalformedEnvelope(f"body of {n} bytes exceeds the limit of {limit}")
    cdef size_t budget = <size_t>(limit if limit > BUDGET_FLOOR else BUDGET_FLOOR) \
        * DECODED_PER_BYTE
    cdef int status = scan_body(buf, n, budget)
    if status != BODY_OK:
        raise MalformedEnvelope(body_error(status, budget))
    return budget


cdef object unpack(const char *buf, size_t n, Py_ssize_t limit=MAX_MESSAGE_DEFAULT):
    """Decode a msgpack body of at most `limit` bytes (see check_body).
    Malformed, oversized or too costly input raises MalformedEnvelope."""
    check_body(buf, n, limit)
    try:
        # The body is at most `limit` bytes, so msgpack's own limits derived
        # from its length are the tightest that a valid body can need: set
        # them here rather than rely on the defaults of a msgpack version.
        return _unpackb(PyBytes_FromStringAndSize(buf, n), raw=False, strict_map_key=False,
                        max_str_len=n, max_bin_len=n, max_ext_len=0,
                        max_array_len=n, max_map_len=n // 2)
    except _UnpackException as exc:
        raise MalformedEnvelope(f"bad msgpack body: {exc}") from None


cdef str body_error(int status, size_t budget):
    if status == BODY_SHORT:
        return "bad msgpack body: a length runs past the end"
    if status == BODY_FORMAT:
        return "bad msgpack body: reserved byte or extension type"
    if status == BODY_DEPTH:
        return f"body nests deeper than {MAX_DEPTH} levels"
    return f"body would decode to more than {budget} bytes"


# -- Python-level entry points: the same functions as _envelope_py ----------

KINDS = {
    "CAST": KIND_CAST, "CALL": KIND_CALL, "FANOUT": KIND_FANOUT,
    "NOTIFY": KIND_NOTIFY, "PING": KIND_PING, "RESULT": KIND_RESULT, "CHUNK": KIND_CHUNK,
    "END": KIND_END, "FAILURE": KIND_FAILURE, "HEARTBEAT": KIND_HEARTBEAT,
    "REFUSED": KIND_REFUSED, "ACK": KIND_ACK,
}
FLAG_MULTI_CALL = FLAG_MULTI
FLAG_ACK_CAST = FLAG_ACK
ENVELOPE_VERSION = VERSION


def encode_header(int kind, int flags, uint64_t msg_id, topic):
    """The header frame for a message, as bytes."""
    cdef char buf[MAX_HEADER]
    cdef const char *t = NULL
    cdef Py_ssize_t tlen = 0
    if topic:
        topic_utf8(topic, &t, &tlen)
    if not (is_request(kind) or is_reply(kind)):
        raise ValueError(f"unknown kind {kind}")
    if is_request(kind) and tlen == 0:
        raise ValueError("a request needs a topic")
    if not 0 <= flags <= 0xffff:
        raise ValueError("flags must fit in 16 bits")
    return PyBytes_FromStringAndSize(buf, write_header(buf, kind, flags, msg_id, t, tlen))


def decode_header(bytes data not None):
    """Parse a header frame: (version, kind, flags, msg_id, topic).
    Raises MalformedEnvelope with the reason."""
    cdef Header h
    cdef int status = parse_header(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), &h)
    if status != HDR_OK:
        raise MalformedEnvelope(_HEADER_ERRORS[status])
    topic = PyBytes_FromStringAndSize(h.topic, h.topic_len) if h.topic_len else b""
    try:
        topic = topic.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedEnvelope("topic is not UTF-8") from None
    return (h.version, h.kind, h.flags, h.msg_id, topic)


def pack_body(obj):
    """msgpack-encode a body."""
    return new_packer().pack(obj)


def unpack_body(bytes data not None, Py_ssize_t limit=MAX_MESSAGE_DEFAULT):
    """msgpack-decode a body of at most `limit` bytes; raises
    MalformedEnvelope on bad input."""
    return unpack(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), limit)


def check_body_limits(bytes data not None, Py_ssize_t limit=MAX_MESSAGE_DEFAULT):
    """Raise MalformedEnvelope unless unpack_body(data, limit) would get past
    the limits on a body; return the decoding budget in bytes."""
    return check_body(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), limit)


def check_topic(topic):
    """Raise TypeError/ValueError unless `topic` is a valid topic name."""
    cdef const char *t
    cdef Py_ssize_t n
    topic_utf8(topic, &t, &n)
