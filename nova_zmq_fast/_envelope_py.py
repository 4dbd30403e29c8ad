"""Pure-Python twin of the Cython envelope codec (`_envelope.pyx`).

It is not used on the message path.  The property and fuzz tests run both
implementations on the same inputs and require identical results, which
keeps the C parser honest about every byte of the format.
"""
import struct

import msgpack

from nova_zmq_fast.exceptions import MalformedEnvelope

ENVELOPE_VERSION = 1
KINDS = {"CAST": 1, "CALL": 2, "FANOUT": 3, "NOTIFY": 4,
         "RESULT": 16, "CHUNK": 17, "END": 18, "FAILURE": 19, "HEARTBEAT": 20}
FLAG_MULTI_CALL = 1
_REQUESTS = {1, 2, 3, 4}
_REPLIES = {16, 17, 18, 19, 20}
_FIXED = struct.Struct("<BBHQB")            # version, kind, flags, msg_id, topic_len
MAX_TOPIC = 255


def _check_topic(topic):
    if not isinstance(topic, str):
        raise TypeError(f"topic must be a str, not {type(topic).__name__}")
    raw = topic.encode("utf-8")
    if not raw:
        raise ValueError("topic must not be empty")
    if len(raw) > MAX_TOPIC:
        raise ValueError(f"topic is {len(raw)} bytes long; the limit is {MAX_TOPIC}")
    if any(c in b"/\\" or c <= 32 or c == 127 for c in raw):
        raise ValueError(f"topic {topic!r} contains a path separator, "
                         f"whitespace or a control character")
    if topic in (".", ".."):
        raise ValueError(f"topic {topic!r} is not a valid name")
    return raw


def encode_header(kind, flags, msg_id, topic):
    raw = _check_topic(topic) if topic else b""
    if kind not in _REQUESTS and kind not in _REPLIES:
        raise ValueError(f"unknown kind {kind}")
    if kind in _REQUESTS and not raw:
        raise ValueError("a request needs a topic")
    if not 0 <= flags <= 0xFFFF:
        raise ValueError("flags must fit in 16 bits")
    return _FIXED.pack(ENVELOPE_VERSION, kind, flags, msg_id, len(raw)) + raw


def decode_header(data):
    data = bytes(data)
    if len(data) < 1:
        raise MalformedEnvelope("truncated header")
    if data[0] != ENVELOPE_VERSION:
        raise MalformedEnvelope("unsupported envelope version")
    if len(data) < _FIXED.size:
        raise MalformedEnvelope("truncated header")
    version, kind, flags, msg_id, tlen = _FIXED.unpack_from(data)
    if kind not in _REQUESTS and kind not in _REPLIES:
        raise MalformedEnvelope("unknown message kind")
    if len(data) < _FIXED.size + tlen:
        raise MalformedEnvelope("truncated header")
    if len(data) != _FIXED.size + tlen or (kind in _REQUESTS and tlen == 0):
        raise MalformedEnvelope("bad topic field")
    try:
        topic = data[_FIXED.size:].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedEnvelope("topic is not UTF-8") from None
    return (version, kind, flags, msg_id, topic)


def pack_body(obj):
    return msgpack.packb(obj, use_bin_type=True)


def unpack_body(data):
    try:
        return msgpack.unpackb(bytes(data), raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise MalformedEnvelope(f"bad msgpack body: {exc}") from None
