"""Envelope codec: what a message looks like on the wire.

Every message is two ZeroMQ frames after the routing frame that ROUTER
sockets add or consume (see docs/envelope.md for the full picture):

  header  13 fixed bytes, then the topic:
            0   version   u8     always 1 for this format
            1   kind      u8     CAST, CALL, FANOUT, NOTIFY / RESULT, CHUNK, END,
                                 FAILURE, HEARTBEAT
            2   flags     u16le  FLAG_MULTI on a CALL asks for a stream
            4   msg_id    u64le  correlates replies with calls; 0 on casts
            12  topic_len u8     1..255 on requests, 0 on replies
            13  topic     UTF-8
  body    msgpack: [context, message] on requests, the value on RESULT and
          CHUNK, the failure on FAILURE, empty on END and HEARTBEAT.

The header is parsed in C straight from the frame's bytes (no Python object
for it), so the receive loop can drop bad or unknown-topic messages before
any msgpack work.  The body is msgpack because it is what the payloads are;
pickle is never used.  `_envelope_py.py` is a pure-Python twin used by the
property and fuzz tests.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_Check
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

import msgpack

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
    return KIND_CAST <= kind <= KIND_NOTIFY


cdef inline bint is_reply(int kind) noexcept nogil:
    return KIND_RESULT <= kind <= KIND_HEARTBEAT


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
    return _Packer(use_bin_type=True, autoreset=True)


cdef object unpack(const char *buf, size_t n):
    """Decode a msgpack body; malformed input raises MalformedEnvelope."""
    try:
        return _unpackb(PyBytes_FromStringAndSize(buf, n),
                        raw=False, strict_map_key=False)
    except _UnpackException as exc:
        raise MalformedEnvelope(f"bad msgpack body: {exc}") from None


# -- Python-level entry points: the same functions as _envelope_py ----------

KINDS = {
    "CAST": KIND_CAST, "CALL": KIND_CALL, "FANOUT": KIND_FANOUT,
    "NOTIFY": KIND_NOTIFY, "RESULT": KIND_RESULT, "CHUNK": KIND_CHUNK,
    "END": KIND_END, "FAILURE": KIND_FAILURE, "HEARTBEAT": KIND_HEARTBEAT,
}
FLAG_MULTI_CALL = FLAG_MULTI
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


def unpack_body(bytes data not None):
    """msgpack-decode a body; raises MalformedEnvelope on bad input."""
    return unpack(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))


def check_topic(topic):
    """Raise TypeError/ValueError unless `topic` is a valid topic name."""
    cdef const char *t
    cdef Py_ssize_t n
    topic_utf8(topic, &t, &n)
